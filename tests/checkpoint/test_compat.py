"""Configuration changes never strand a run (issue 23 item 6): a checkpoint written by an older version resumes,
generates and exports under today's schema.

The fixture `tests/fixtures/ckpt_v0/` is a 2-step mHC run of the test model written by main at accdc7a
(`tests/fixtures/make_ckpt_v0.py`), hand-edited so that its saved config holds keys today's schema may not know
(`connection.deterministic`, deleted by issue 23, and the invented `connection.retired_option`) and lacks two keys
that exist today at their defaults (`model.n_kv_head`, `connection.hc_out_proj_init`: keys added later)."""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

import pytest
import torch

from mhc_train.checkpoint import CheckpointError, compare_configs, drop_removed, load_step_file
from mhc_train.config import Config, load_config, to_dict
from mhc_train.infer.export import export
from mhc_train.infer.generate import SamplingConfig, generate
from mhc_train.infer.load import load_checkpoint
from mhc_train.train.metrics import read_metrics
from mhc_train.train.trainer import Trainer
from tests.support.configs import run_overrides
from tests.support.logs import collect_progress

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "ckpt_v0"
STEP = "checkpoints/step_00000002.pt"


@pytest.fixture
def v0(tmp_path):
    """A writable copy of the fixture run directory."""
    return Path(shutil.copytree(FIXTURE, tmp_path / "v0"))


def _notices(messages: list[str]) -> list[str]:
    return [m for m in messages if "retired_option" in m]


def test_the_fixture_holds_a_removed_key_and_lacks_keys_added_later():
    config = load_step_file(FIXTURE / STEP)["config"]
    assert config["connection"]["retired_option"] == 1 and "deterministic" in config["connection"]
    assert "n_kv_head" not in config["model"] and "hc_out_proj_init" not in config["connection"]


def test_the_rule_on_config_dicts():
    current = to_dict(Config())
    saved = copy.deepcopy(current)
    del saved["model"]["n_kv_head"]  # added later, at its default now: unchanged
    saved["connection"]["retired_option"] = 1  # removed later: dropped with a notice
    saved["train"]["old_knob"] = {"a": 1}
    with collect_progress() as c:
        kept = drop_removed(saved, "checkpoint x.pt")
    (line,) = _notices(c.messages)
    assert "checkpoint x.pt" in line and "connection.retired_option=1" in line and "train.old_knob.a=1" in line
    assert compare_configs(kept, current) == ([], [])
    changed = copy.deepcopy(current)
    changed["model"]["n_kv_head"] = 2  # added later, NOT at its default: the model changed
    changed["model"]["dim"] = 48
    changed["optim"]["lr"] = 1e-4
    fatal, allowed = compare_configs(kept, changed)
    assert fatal == ["model.dim: 256 -> 48", "model.n_kv_head: None -> 2"], fatal
    assert len(allowed) == 1 and allowed[0].startswith("optim.lr:") and allowed[0].endswith("-> 0.0001"), allowed
    before_names = copy.deepcopy(kept)
    del before_names["connection"]["name"]  # a checkpoint from before the arm's label existed
    named = copy.deepcopy(current)
    named["connection"]["name"] = "mhc"  # today's preset sets it: no change at all, not even an allowed one
    assert compare_configs(before_names, named) == ([], [])
    saved_named = copy.deepcopy(named)
    saved_named["connection"]["name"] = "mhc_hclike"  # a recorded label that differs: reported, never fatal
    assert compare_configs(saved_named, named)[0] == []


def test_an_old_checkpoint_resumes_and_the_run_continues(prepared_data, v0):
    cfg = load_config(run_overrides(prepared_data, v0, connection="mhc", **{"train.max_steps": 4}))
    with collect_progress() as c:
        t = Trainer(cfg)
        assert t.step == 2
        t.run()
    assert len(_notices(c.messages)) == 1, c.messages
    assert t.step == 4 and (v0 / "checkpoints/step_00000004.pt").is_file()
    losses = {r["step"]: r["loss"] for r in read_metrics(v0)["train"]}
    assert sorted(losses) == [3, 4] and all(torch.isfinite(torch.tensor(v)) for v in losses.values()), losses


def test_a_real_model_change_stays_fatal_with_its_message(prepared_data, v0):
    for change, line in (
        ({"model.dim": 48}, "model.dim: 32 -> 48"),
        ({"model.n_kv_head": 2}, "model.n_kv_head: None -> 2"),
    ):
        cfg = load_config(run_overrides(prepared_data, v0, connection="mhc", **{"train.max_steps": 4, **change}))
        with pytest.raises(CheckpointError, match="the config changes the model") as e:
            Trainer(cfg)
        assert line in str(e.value) and "retired_option" not in str(e.value)


def test_an_old_checkpoint_generates_and_exports(v0, tmp_path):
    from transformers import AutoModelForCausalLM

    with collect_progress() as c:
        loaded = load_checkpoint(v0)
    assert len(_notices(c.messages)) == 1, c.messages
    assert loaded.step == 2 and loaded.model.conn_cfg.type == "mhc" and loaded.model.cfg.n_kv_head == 0
    ids = loaded.tokenizer.encode("HAMLET. To be, or not")
    ours = generate(loaded.model, [ids], SamplingConfig(max_new_tokens=6, stop_at_eos=False))[0]
    assert len(ours) == 6
    hf = AutoModelForCausalLM.from_pretrained(export(loaded, tmp_path / "hf"), trust_remote_code=True).eval()
    theirs = hf.generate(torch.tensor([ids]), max_new_tokens=6, min_new_tokens=6, do_sample=False)
    assert theirs[0, len(ids) :].tolist() == ours
