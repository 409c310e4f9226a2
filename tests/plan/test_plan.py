"""`mhc-train plan` (issue 24, item 10): the CLI's JSON schema and refusals, a 13B plan on the fake process group in
well under a minute, and its prediction against the per-rank peak of live tensor bytes a real step holds at 2 gloo
ranks (FSDP, DDP, a 1F1B pipeline), and in one process."""

from __future__ import annotations

import json
import subprocess
import time

import pytest

from mhc_train.cli import main
from mhc_train.config import load_config
from mhc_train.plan import KEYS, make_plan
from mhc_train.plan.measure import measure_rank
from mhc_train.plan.table import MARK_END, MARK_START, overrides
from tests.support import launch

SMALL = [
    "model=test", "train=test", "model.dim=128", "model.n_layer=4", "model.n_head=4", "model.vocab_size=2048",
    "model.max_seq_len=128", "train.seq_len=128", "train.batch_size=4", "train.device=cpu", "train.precision=fp32",
    "logging.wandb=false",
]  # fmt: skip
TOLERANCE = 0.20


def test_json_is_one_object_with_exactly_the_per_gpu_keys(capsys):
    main(["plan", "model=test", "train=gpu", "train.seq_len=64", "parallel=fsdp", "--world", "8", "--json"])
    out = json.loads(capsys.readouterr().out)  # stdout is the JSON object alone
    assert set(out["per_gpu_gib"]) == set(KEYS) == {"params", "grads", "optimizer", "activations", "buffers", "total"}
    assert out["world"] == 8 and isinstance(out["fits"], bool) and out["engine"].startswith("fsdp: 8 ranks")
    assert out["per_gpu_gib"]["activations"] > 0


def test_a_world_the_layout_cannot_hold_exits_with_one_line(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["plan", "model=test", "train=test", "parallel=pp_1f1b", "train.grad_accum=1", "--world", "3"])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code != 0 and len(err.splitlines()) == 1 and "parallel.pp" in err


def _readme_cell(model: str, preset: str, world: int) -> list[str]:
    """The README fit table's cell (scripts/plan_table.py) for `model`, `preset`, `world`: [total GiB, verdict]."""
    text = (launch.REPO / "README.md").read_text()
    lines = text[text.index(MARK_START) : text.index(MARK_END)].splitlines()
    row = next(r for r in lines if r.startswith(f"| {model} | `{preset}`"))
    worlds = [c.strip() for c in lines[1].split("|")[3:-1]]
    return row.split("|")[3:-1][worlds.index(f"{world} GPUs")].split()


def test_a_13b_plan_on_the_fake_process_group_takes_under_a_minute_and_matches_the_readme():
    t0 = time.perf_counter()
    plan = make_plan(load_config(overrides("13b", "fsdp", 16)), 16)
    assert time.perf_counter() - t0 < 60
    g = plan["per_gpu_gib"]
    assert 13.0e9 * 4 / 16 / 2**30 * 0.99 < g["params"] < 13.1e9 * 4 / 16 / 2**30 * 1.01  # 1/16 of fp32 13B
    assert g["optimizer"] == pytest.approx(2 * g["params"], rel=1e-3)
    total, verdict = _readme_cell("13b", "fsdp", 16)  # the README's table says what the plan says
    assert float(total) == pytest.approx(g["total"], abs=0.05) and (verdict == "fits") == plan["fits"]


def _check(predicted: dict, measured: int) -> None:
    total = predicted["total"]
    assert abs(total - measured) <= TOLERANCE * measured, (
        f"predicted {total / 2**20:.1f} MiB, measured {measured / 2**20:.1f} MiB"
    )
    without = total - predicted["activations"]  # the check has teeth: the activation term alone breaks it
    assert abs(without - measured) > TOLERANCE * measured


def test_one_process_prediction_matches_the_measured_peak():
    cfg = load_config([*SMALL, "model.dim=64", "train.batch_size=2", "train.precision=bf16"])  # autocast copies
    measured = measure_rank(cfg)["peak"]
    _check(make_plan(cfg, 1)["bytes"], measured)


@pytest.mark.slow
def test_prediction_matches_the_measured_peak_of_each_rank(tmp_path):
    """FSDP, DDP and a 1F1B pipeline at 2 gloo ranks, in one launch: every rank's measured peak against the plan's
    largest rank."""
    presets = ["fsdp", "ddp", "pp_1f1b"]
    overrides = [*SMALL, "train.grad_accum=1"]
    cmd = launch.torchrun_cmd(["--presets", ",".join(presets), *overrides], module="mhc_train.plan.measure")
    proc = subprocess.run(cmd, cwd=launch.REPO, env=launch.env(PLAN_MEASURE_OUT=str(tmp_path)), capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [json.loads(p.read_text()) for p in sorted(tmp_path.glob("rank*.json"))]
    assert len(ranks) == 2
    for preset in presets:
        peak = max(r[preset]["peak"] for r in ranks)
        _check(make_plan(load_config([*overrides, f"parallel={preset}"]), 2)["bytes"], peak)
