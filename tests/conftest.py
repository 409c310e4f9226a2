"""Pytest's fixtures and hooks only (helpers live in tests/support/, which no test reaches through here):
the test environment applied before anything imports triton, a fixed seed per test, the prepared Shakespeare data
and the shared one-process reference runs (one per session each), and the `matrix_full` gate.

`make test-fast` deselects `slow` (subprocess and multi-rank tests); `matrix_full` cases (the rest of the
multi-rank matrix beyond one representative per row) run only with MHC_TRAIN_MATRIX_FULL=1 (`make test-matrix`)."""

from tests.support import environment

environment.apply()  # before pytest imports any test module (and with it torch and triton)

import os  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

MATRIX_FULL_ENV = "MHC_TRAIN_MATRIX_FULL"


def pytest_collection_modifyitems(config, items):
    if os.environ.get(MATRIX_FULL_ENV, "") not in ("", "0"):
        return
    skip = pytest.mark.skip(reason=f"the full matrix: `make test-matrix` (or {MATRIX_FULL_ENV}=1) runs it")
    for item in items:
        if "matrix_full" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def prepared_data(tmp_path_factory):
    """The bundled Shakespeare corpus prepared once per session with a 512-piece tokenizer (~4 s): the prepared
    directory itself (`<root>/<key>/`), which runs take as data.out_dir (a directory holding a manifest is reused)."""
    from pathlib import Path

    from mhc_train.config import DataConfig
    from mhc_train.data import prepare

    out = tmp_path_factory.mktemp("data") / "shakespeare_v512"
    return Path(prepare(DataConfig(out_dir=str(out), vocab_size=512))["dir"])


@pytest.fixture(scope="session")
def reference_runs(prepared_data, tmp_path_factory):
    """`reference_runs(**overrides)`: the run directory of one process trained on `prepared_data` with the test model
    and `overrides`, trained the first time a test asks for those settings and shared after that."""
    from tests.support.launch import ReferenceRuns

    return ReferenceRuns(prepared_data, tmp_path_factory.mktemp)
