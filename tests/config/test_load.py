"""Config mistakes fail with one line that names the key or file, what was expected and a fix that works.

Each case is checked through `load_config` and through the CLI (`error: ...`, exit 2, no traceback); the CLI runs
start together in one fixture, so the file costs one interpreter start-up, not one per case.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from mhc_train.config import ConfigError, config_dir, load_config

REPO = Path(__file__).resolve().parents[2]


def _error(overrides=(), config_file=None) -> str:
    with pytest.raises(ConfigError) as e:
        load_config(list(overrides), config_file=config_file)
    msg = str(e.value)
    assert "\n" not in msg, msg
    return msg


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("cfg")
    (d / "bad.yaml").write_text("train:\n  max_steps: [1, 2\n")  # unclosed flow sequence
    (d / "folder").mkdir()
    (d / "folder" / "run.yaml").write_text("train:\n  max_steps: 5\n")
    (d / "list.yaml").write_text("- train\n- model\n")
    (d / "typo.yaml").write_text("train:\n  bacth_size: 4\n")
    (d / "type.yaml").write_text("train:\n  batch_size: abc\n")
    return d


# name -> (CLI arguments after `train`, the exact stderr line without "error: ")
def _cli_cases(d: Path) -> dict:
    return {
        "typo": (["train.max_step=5"], "unknown config key train.max_step; did you mean train.max_steps?"),
        "type": (
            ["train.batch_size=abc"],
            "train.batch_size expects an integer, got 'abc' (e.g. train.batch_size=16)",
        ),
        "bad_yaml": (
            ["--config", str(d / "bad.yaml")],
            f"config file {d / 'bad.yaml'} is not valid YAML: expected ',' or ']', but got '<stream end>' "
            "at line 3, column 1; fix the syntax there",
        ),
        "directory": (
            ["--config", str(d / "folder")],
            f"config file {d / 'folder'} is a directory, not a YAML file: pass one of its files, e.g. "
            f"--config {d / 'folder' / 'run.yaml'}",
        ),
        "missing": (
            ["--config", str(d / "missing.yaml")],
            f"config file {d / 'missing.yaml'} does not exist: check the path",
        ),
    }


@pytest.fixture(scope="module")
def cli_runs(files):
    """All CLI cases at once (each is an interpreter start-up importing torch): name -> (returncode, stderr)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "offline"}
    env["PYTHONWARNINGS"] = "ignore"  # stderr must be exactly the error line
    procs = {
        name: subprocess.Popen(
            [sys.executable, "-m", "mhc_train.cli", "train", *args],
            cwd=files,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name, (args, _) in _cli_cases(files).items()
    }
    out = {}
    for name, p in procs.items():
        _, err = p.communicate(timeout=120)
        out[name] = (p.returncode, err)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("name", ["typo", "type", "bad_yaml", "directory", "missing"])
def test_cli_prints_one_error_line_and_exits_2(cli_runs, files, name):
    rc, err = cli_runs[name]
    expected = _cli_cases(files)[name][1]
    assert "Traceback" not in err, err
    assert err.strip().splitlines()[-1] == f"error: {expected}", err
    assert rc == 2, (rc, err)


def test_misspelt_key_suggests_the_schema_key_never_plus():
    msg = _error(["train.max_step=5"])
    assert msg == "unknown config key train.max_step; did you mean train.max_steps?"
    assert load_config(["model=test", "train=test", "train.max_steps=5"]).train.max_steps == 5  # the suggestion works
    assert _error(["+train.max_step=5"]) == msg  # a `+` makes no difference
    # top level: the group name, then the rest of the path corrected where it is close
    assert _error(["trian.max_steps=3"]) == "unknown config key trian.max_steps; did you mean train.max_steps?"
    assert _error(["trian.max_stp=3"]) == "unknown config key trian.max_stp; did you mean train.max_steps?"
    assert _error(["modle=test"]) == "unknown config key modle; did you mean model?"
    assert _error(["run_nam=x"]) == "unknown config key run_nam; did you mean run_name?"
    # a key of another section
    assert _error(["train.lr=0.1"]).endswith("did you mean optim.lr?")
    # nothing close: the keys that exist there
    msg = _error(["train.zzz=1"])
    assert msg.startswith("unknown config key train.zzz; train has no such key (known keys: seed, max_steps,"), msg
    for m in (_error(["train.max_step=5"]), _error(["trian.max_steps=3"]), msg):
        assert "+" not in m, m


def test_wrong_type_names_key_expected_type_and_value():
    assert (
        _error(["train.batch_size=abc"]) == "train.batch_size expects an integer, got 'abc' (e.g. train.batch_size=16)"
    )
    assert _error(["train.batch_size=1.5"]).startswith("train.batch_size expects an integer, got 1.5")
    assert _error(["optim.lr=fast"]).startswith("optim.lr expects a number, got 'fast'")
    assert _error(["train.compile=maybe"]).startswith("train.compile expects true or false, got 'maybe'")
    assert _error(["schedule.step_milestones=[0.5,x]"]) == (
        "schedule.step_milestones expects a list of numbers, got [0.5, 'x'] (e.g. schedule.step_milestones=[0.8,0.9])"
    )
    # what OmegaConf converts is accepted: a quoted number, an interpolation
    cfg = load_config(["model=test", "train=test", "train.batch_size='8'", "data.vocab_size=${model.vocab_size}"])
    assert cfg.train.batch_size == 8 and cfg.data.vocab_size == 512


def test_unknown_group_option_lists_the_files():
    msg = _error(["model=tset"])
    assert msg.startswith("config group model has no option 'tset'"), msg
    presets = ", ".join(sorted(p.stem for p in (REPO / "configs" / "model").glob("*.yaml")))  # every model preset
    assert "did you mean model=test?" in msg and f"available: {presets}" in msg and "1.3b, 125m, 13b" in msg
    assert "Config search path" not in msg


def test_config_file_problems_name_the_file(files):
    assert _error(config_file=str(files / "bad.yaml")).startswith(f"config file {files / 'bad.yaml'} is not valid YAML")
    assert "is a directory" in _error(config_file=str(files / "folder"))
    assert "does not exist" in _error(config_file=str(files / "missing.yaml"))
    msg = _error(config_file=str(files / "list.yaml"))
    assert msg.startswith(f"config file {files / 'list.yaml'} must hold a mapping of config keys"), msg
    assert _error(config_file=str(files / "typo.yaml")) == (
        f"unknown config key train.bacth_size in {files / 'typo.yaml'}; did you mean train.batch_size?"
    )
    assert _error(config_file=str(files / "type.yaml")) == (
        f"train.batch_size expects an integer, got 'abc' in {files / 'type.yaml'} (the default is 16)"
    )
    assert (
        load_config(["model=test", "train=test"], config_file=str(files / "folder" / "run.yaml")).train.max_steps == 5
    )


def test_config_dir_override_and_repo_default(monkeypatch, tmp_path):
    monkeypatch.delenv("MHC_TRAIN_CONFIG_DIR", raising=False)
    assert Path(config_dir()) == REPO / "configs"  # a source checkout (or an editable install)
    monkeypatch.setenv("MHC_TRAIN_CONFIG_DIR", str(REPO / "configs"))
    assert config_dir() == str(REPO / "configs")
    monkeypatch.setenv("MHC_TRAIN_CONFIG_DIR", str(tmp_path / "nowhere"))
    with pytest.raises(ConfigError, match="MHC_TRAIN_CONFIG_DIR=.*nowhere.* is not a directory"):
        load_config([])


def test_removed_deterministic_key_is_an_unknown_key():
    """connection.deterministic was deleted (the phi gradient is always bit-reproducible): setting it names the key."""
    msg = _error(["connection.deterministic=true"])
    assert msg.startswith("unknown config key connection.deterministic; connection has no such key"), msg


def test_pipeline_rules_run_whatever_was_imported():
    """The pipeline rules are part of `validate` (no import-time registration): a fresh interpreter that imports
    only mhc_train.config rejects a bad pipeline config, and has not imported mhc_train.parallel."""
    code = (
        "import sys\n"
        "from mhc_train.config import ConfigError, load_config\n"
        "try:\n"
        "    load_config(['model=test', 'model.n_layer=3', 'train=test', 'parallel.pp=2'])\n"
        "except ConfigError as e:\n"
        "    print(e)\n"
        "print('mhc_train.parallel' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "parallel.pp=2 is invalid: 1f1b needs model.n_layer=3 divisible by its 2 stages" in out, out
    assert out.strip().endswith("False"), out


def test_config_error_is_the_package_error_and_a_value_error():
    from mhc_train.errors import MhcTrainError

    assert issubclass(ConfigError, MhcTrainError) and issubclass(ConfigError, ValueError)
