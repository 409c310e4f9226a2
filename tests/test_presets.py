"""Every `configs/parallel/*.yaml` preset loads through the schema and passes the world-size rules for the world its
comment documents; `scripts/gpu_check.sh` parses (`bash -n`). Fast: nothing trains."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from mhc_train.config import ConfigError, ParallelConfig, load_config, validate_world

REPO = Path(__file__).resolve().parents[1]
PRESET_DIR = REPO / "configs" / "parallel"
BASE = ["model=test", "train=test"]

# preset -> (the worlds its comment documents, overrides that make the test model and batch fit)
PRESETS = {
    "single": ([1], []),
    "recompute_mhc": ([1], []),
    "ddp": ([2, 8], ["train.batch_size=8"]),
    "fsdp": ([2, 8], ["train.batch_size=8"]),
    "fsdp_recompute": ([2, 8], ["train.batch_size=8"]),
    "zero1": ([2, 8], ["train.batch_size=8"]),
    "zero2": ([2, 8], ["train.batch_size=8"]),
    "zero3": ([2, 8], ["train.batch_size=8"]),
    "pp_1f1b": ([2], []),
    "pp_dualpipev": ([2], ["model.n_layer=4"]),
    "pp_fsdp": ([4, 8], ["train.batch_size=16"]),
    "tp2_fsdp": ([4, 8], ["train.batch_size=8"]),
    "tp4_fsdp": ([8], ["train.batch_size=8"]),
    "ep": ([2], ["model.ffn=moe", "model.moe.n_routed_experts=4"]),
    "pp_tp_fsdp": ([8], ["train.batch_size=8"]),
    "pp_dualpipev_ep": ([6], ["model=moe_test", "model.n_layer=6", "train.batch_size=12"]),
}


def test_every_preset_file_is_covered():
    assert sorted(p.stem for p in PRESET_DIR.glob("*.yaml")) == sorted(PRESETS)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_loads_and_fits_its_world(name):
    worlds, overrides = PRESETS[name]
    cfg = load_config([*BASE, f"parallel={name}", *overrides])  # unknown keys, wrong types, cross-field rules
    for world in worlds:
        validate_world(cfg, world)
    text = (PRESET_DIR / f"{name}.yaml").read_text()
    keys = {m.group(1) for m in re.finditer(r"^(\w+):", text, flags=re.MULTILINE)}
    assert keys <= set(ParallelConfig.__dataclass_fields__), keys
    assert text.startswith("#"), "each preset starts with a comment saying what it is"
    if worlds != [1]:  # multi-process presets: the comment gives the torchrun line with the documented world
        launch = re.search(r"^#\s+torchrun --nproc_per_node=(\d+) -m mhc_train\.train parallel=(\w+)", text, re.M)
        assert launch is not None, f"{name}.yaml has no torchrun line in its comment"
        assert launch.group(2) == name and int(launch.group(1)) in worlds
        assert "World:" in text


@pytest.mark.parametrize("name", [n for n, (worlds, _) in sorted(PRESETS.items()) if worlds != [1]])
def test_documented_launch_line_validates(name):
    """The torchrun line in the preset's comment, as written (its overrides, its --nproc_per_node), passes."""
    text = (PRESET_DIR / f"{name}.yaml").read_text()
    launch = re.search(r"^#\s+torchrun --nproc_per_node=(\d+) -m mhc_train\.train (.*)$", text, flags=re.MULTILINE)
    cfg = load_config(launch.group(2).split())
    assert cfg.parallel == load_config([*BASE, f"parallel={name}", *PRESETS[name][1]]).parallel
    validate_world(cfg, int(launch.group(1)))


def test_pipeline_presets_use_the_papers_recompute():
    for name in ("pp_1f1b", "pp_dualpipev", "pp_fsdp"):
        cfg = load_config([*BASE, f"parallel={name}", "model.n_layer=4", "train.batch_size=16"])
        assert cfg.parallel.pp == 2 and cfg.parallel.recompute == "mhc" and cfg.parallel.recompute_block == "stage"
    assert load_config([*BASE, "parallel=pp_dualpipev", "model.n_layer=4"]).parallel.pp_schedule == "dualpipev"
    assert load_config([*BASE, "parallel=zero3", "train.batch_size=8"]).parallel.zero_stage == 3


def test_presets_refuse_a_wrong_world():
    """The world rules still bite through a preset: a pipeline alone on 4 ranks, DDP on a batch it cannot split."""
    with pytest.raises(ConfigError, match="parallel.engine"):
        validate_world(load_config([*BASE, "parallel=pp_1f1b"]), 4)
    with pytest.raises(ConfigError, match="train.batch_size"):
        validate_world(load_config([*BASE, "parallel=ddp"]), 3)
    with pytest.raises(ConfigError, match="model.n_layer"):  # DualPipeV: 4 stages on the 2-block test model
        load_config([*BASE, "parallel=pp_dualpipev"])


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("bash") is None, reason="no bash")
def test_gpu_check_script_parses():
    script = REPO / "scripts" / "gpu_check.sh"
    result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
