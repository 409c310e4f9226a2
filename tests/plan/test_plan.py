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


def test_a_13b_plan_on_the_fake_process_group_takes_under_a_minute():
    t0 = time.perf_counter()
    plan = make_plan(load_config(["model=13b", "train=gpu", "parallel=fsdp", "train.batch_size=16"]), 16)
    assert time.perf_counter() - t0 < 60
    g = plan["per_gpu_gib"]
    assert 13.0e9 * 4 / 16 / 2**30 * 0.99 < g["params"] < 13.1e9 * 4 / 16 / 2**30 * 1.01  # 1/16 of fp32 13B
    assert g["optimizer"] == pytest.approx(2 * g["params"], rel=1e-3)


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


@pytest.mark.parametrize("model, preset, world", [("7b", "fsdp", 8), ("13b", "fsdp", 16)])
def test_the_readme_fit_table_matches_the_plan(model, preset, world):
    """Two cells of the README's table (scripts/plan_table.py), one that fits and one that does not, re-planned."""
    from mhc_train.plan.table import MARK_END, MARK_START, overrides

    text = (launch.REPO / "README.md").read_text()
    table = text[text.index(MARK_START) : text.index(MARK_END)]
    header, row = table.splitlines()[1], next(r for r in table.splitlines() if r.startswith(f"| {model} | `{preset}`"))
    cell = row.split("|")[3:-1][[c.strip() for c in header.split("|")[3:-1]].index(f"{world} GPUs")].split()
    plan = make_plan(load_config(overrides(model, preset, world)), world)
    assert float(cell[0]) == pytest.approx(plan["per_gpu_gib"]["total"], abs=0.05)
    assert (cell[1] == "fits") == plan["fits"]
