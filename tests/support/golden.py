"""The golden per-step loss file: the demo model (configs/model/demo.yaml, the demo experiment's settings) trained
on CPU for a few steps in each arm (residual, hc, mhc), seed 0, one thread, its per-step train losses kept as exact
float reprs beside the torch version and the settings that made them.

Any change of numerics must regenerate it on purpose, and say so in its commit:

    MHC_TRAIN_UPDATE_GOLDEN=1 python -m pytest -q tests/train/test_golden_losses.py
    # or, outside pytest:
    python -m tests.support.golden

Notable choices: one CPU thread (a thread count may change a reduction's order, hence the last bit); train.log_every=1
so every step is recorded (logging reads the loss only, it changes no numerics); the data is the bundled Shakespeare
prepared at the demo's vocabulary (4096) with the default data settings; the runs are in-process, one after another.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

GOLDEN = Path(__file__).resolve().parent.parent / "assets" / "losses_golden_cpu.json"
UPDATE_ENV = "MHC_TRAIN_UPDATE_GOLDEN"
ARMS = ("residual", "hc", "mhc")
VOCAB = 4096  # configs/model/demo.yaml
SETTINGS = {
    "+experiment": "demo",
    "train.max_steps": 8,
    "train.batch_size": 4,
    "train.log_every": 1,
    "train.threads": 1,
    "train.seed": 0,
    "train.device": "cpu",
    "train.progress": "false",
    "logging.wandb": "false",
}


def overrides(arm: str, data_dir, run_dir) -> list[str]:
    """The Hydra overrides of one arm's golden run (the data and run directories vary, nothing else)."""
    fields = {**SETTINGS, "connection": arm, "data.out_dir": str(data_dir), "run_dir": str(run_dir)}
    return [f"{k}={v}" for k, v in fields.items()]


def prepare_data(out_dir: Path) -> Path:
    """The bundled Shakespeare prepared at the demo's vocabulary; returns the prepared directory."""
    from mhc_train.config import DataConfig
    from mhc_train.data import prepare

    return Path(prepare(DataConfig(out_dir=str(out_dir), vocab_size=VOCAB))["dir"])


def run_arm(arm: str, data_dir: Path, run_dir: Path) -> list[float]:
    """Train one arm in this process; its train losses in step order (steps 1..max_steps)."""
    import torch

    from mhc_train.config import load_config
    from mhc_train.train.metrics import read_metrics
    from mhc_train.train.trainer import train

    threads = torch.get_num_threads()
    try:
        train(load_config(overrides(arm, data_dir, run_dir)))  # its lines go to captured stdout
    finally:
        torch.set_num_threads(threads)  # the run sets one thread; leave the process as it was
    records = read_metrics(run_dir)["train"]
    assert [r["step"] for r in records] == list(range(1, SETTINGS["train.max_steps"] + 1)), "a step was not logged"
    return [float(r["loss"]) for r in records]


def run_all(work: Path) -> dict[str, list[float]]:
    data_dir = prepare_data(work / "data")
    return {arm: run_arm(arm, data_dir, work / "runs" / arm) for arm in ARMS}


def document(losses: dict[str, list[float]]) -> dict:
    import torch

    return {
        "what": "per-step train losses of the demo model on CPU, seed 0; exact float reprs for the torch below",
        "torch": torch.__version__,
        "regenerate": f"{UPDATE_ENV}=1 python -m pytest -q tests/train/test_golden_losses.py",
        "command": "mhc_train.train.trainer.train(mhc_train.config.load_config(overrides)) per arm, in one process",
        "data": f"bundled Shakespeare, prepare(DataConfig(vocab_size={VOCAB})) with the default data settings",
        "overrides": {**SETTINGS, "connection": "<arm>", "data.out_dir": "<prepared>", "run_dir": "<tmp>"},
        "losses": {arm: [repr(v) for v in vals] for arm, vals in losses.items()},
    }


def write(losses: dict[str, list[float]], path: Path = GOLDEN) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document(losses), indent=1) + "\n")


def read(path: Path = GOLDEN) -> dict:
    """The golden document with its losses as floats again."""
    doc = json.loads(path.read_text())
    doc["losses"] = {arm: [float(v) for v in vals] for arm, vals in doc["losses"].items()}
    return doc


def first_difference(expected: list[float], actual: list[float]) -> str | None:
    """A one-line description of the first step whose loss differs (steps count from 1), or None when equal."""
    for i, (e, a) in enumerate(zip(expected, actual)):
        if e != a:
            return f"step {i + 1}: golden {e!r}, now {a!r} (difference {a - e:.3e})"
    if len(expected) != len(actual):
        return f"{len(expected)} golden steps, {len(actual)} now"
    return None


def updating() -> bool:
    return os.environ.get(UPDATE_ENV, "") not in ("", "0")


if __name__ == "__main__":
    import tempfile

    from tests.support import environment

    environment.apply()

    with tempfile.TemporaryDirectory() as tmp:
        write(run_all(Path(tmp)))
    print(f"wrote {GOLDEN}")
