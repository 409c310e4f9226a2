"""`experiment=stability` end to end at a tiny size (issue 15): the deep-narrow preset loads, HC and mHC train with
diagnostics every few steps, and the comparison plots the composite gain over steps."""

import json

from mhc_train.analysis import compare
from mhc_train.config import load_config
from mhc_train.train.metrics import read_metrics
from mhc_train.train.trainer import Trainer


def test_stability_preset_is_deep_and_aggressive():
    cfg = load_config(["+experiment=stability"])
    assert cfg.model.n_layer == 24 and cfg.model.dim <= 64 and cfg.optim.lr >= 1e-2 and cfg.optim.grad_clip > 0
    assert cfg.train.max_steps >= 200 and cfg.train.diag_every <= 20
    for size in ("125m", "350m"):  # the GPU study presets: ~1.3B tokens each, every arm of their comment's command
        for arm in ("mhc_hclike", "mhc_single_pass", "mhc_deepseek_v4"):
            cfg = load_config([f"+experiment=study_gpu_{size}", f"connection={arm}"])
            t = cfg.train
            assert 1.2e9 < t.max_steps * t.batch_size * t.seq_len * t.grad_accum < 1.4e9 and t.device == "cuda"
    cfg = load_config(["+experiment=stability", "connection=mhc_single_pass_hclike"])  # the single-pass stability arm
    assert cfg.connection.type == "mhc_single_pass" and cfg.connection.b_res_init == "identity"


def test_stability_runs_end_to_end_and_plots_gain_over_steps(prepared_data, tmp_path):
    runs = []
    for arm in ("hc", "mhc"):
        overrides = [
            "+experiment=stability",
            f"connection={arm}",
            "model.n_layer=3",
            "model.vocab_size=512",
            "train.max_steps=6",
            "train.diag_every=2",
            "train.eval_every=3",
            "train.batch_size=2",
            "train.seq_len=32",
            "train.progress=false",
            f"data.out_dir={prepared_data}",
            "logging.wandb=false",
            f"run_dir={tmp_path / arm}",
        ]
        Trainer(load_config(overrides)).run()
        recs = read_metrics(tmp_path / arm)
        assert [d["step"] for d in recs["diag"]] == [2, 4, 6]
        assert all(isinstance(r["clipped"], bool) and r["grad_norm"] > 0 for r in recs["train"])
        runs.append(tmp_path / arm)
    mhc_gain = [d["composite_bwd_gain_max"] for d in read_metrics(tmp_path / "mhc")["diag"]]
    assert max(mhc_gain) < 2.0  # doubly stochastic up to the column error
    result = compare(runs, tmp_path / "cmp")
    assert (tmp_path / "cmp" / "compare.png").stat().st_size > 10_000
    assert "| hc | 0.01 | 1 |" in (tmp_path / "cmp" / "summary.md").read_text()
    assert json.loads((tmp_path / "cmp" / "summary.json").read_text())["seeds"]["step"] == 6
    assert {r["arm"] for r in result["rows"]} == {"hc", "mhc"}
