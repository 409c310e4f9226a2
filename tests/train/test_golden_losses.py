"""The golden per-step losses: the demo model's three arms on CPU must reproduce tests/assets/losses_golden_cpu.json
exactly (every bit of every step) under the torch version that wrote it. A change of numerics regenerates the file on
purpose: `MHC_TRAIN_UPDATE_GOLDEN=1 python -m pytest -q tests/train/test_golden_losses.py` (see tests/support/golden.py).
"""

import pytest
import torch

from tests.support import golden


@pytest.fixture(scope="module")
def golden_losses(tmp_path_factory):
    return golden.run_all(tmp_path_factory.mktemp("golden"))


def test_losses_equal_the_golden_file(golden_losses):
    if golden.updating():
        golden.write(golden_losses)
        pytest.skip(f"{golden.UPDATE_ENV} set: wrote {golden.GOLDEN}")
    doc = golden.read()
    if doc["torch"] != torch.__version__:
        pytest.skip(
            f"the golden losses were written by torch {doc['torch']}, this is {torch.__version__}: not comparable"
        )
    assert sorted(golden_losses) == sorted(doc["losses"])
    for arm, expected in doc["losses"].items():
        diff = golden.first_difference(expected, golden_losses[arm])
        assert diff is None, f"{arm}: {diff}; a change of numerics on purpose regenerates: {doc['regenerate']}"
