"""transformers (5.x) imports the `kernels` package (Hugging Face hub kernels, one of its dependencies) when it is
installed. This repository's top-level `kernels/` folder (installed as `mhc_kernels`) shadows it whenever the
repository root is on sys.path, as it is under `python -m pytest` from the root, and transformers then fails with
"cannot import name 'CUDAProperties' from 'kernels'". Import the installed package first, with the root off the path,
so the tests here load `transformers` as an installed `mhc-train` does."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _import_installed_kernels() -> None:
    if "kernels" in sys.modules:
        return
    saved = sys.path[:]
    sys.path[:] = [p for p in saved if Path(p or ".").resolve() != ROOT]
    try:
        import kernels  # noqa: F401  (the installed package, cached in sys.modules for transformers)
    except ImportError:
        pass  # not installed: transformers does not import it either
    finally:
        sys.path[:] = saved


_import_installed_kernels()
