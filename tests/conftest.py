import os

# Offline everywhere: a hub name otherwise hangs ~23 s without internet; wandb needs no account offline.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Triton kernels run through the interpreter on CPU; it must be chosen before anything imports triton.
if os.environ.get("CUDA_VISIBLE_DEVICES", "") != "" or os.path.exists("/dev/nvidia0"):
    pass  # a GPU machine: kernels compile for real
else:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


def assert_close(actual, expected, atol, rtol=0.0, what=""):
    """Compare and print max abs diff and relative error on failure."""
    actual, expected = actual.detach().double(), expected.detach().double()
    diff = (actual - expected).abs()
    max_abs = diff.max().item() if diff.numel() else 0.0
    rel = max_abs / max(expected.abs().max().item(), 1e-30)
    assert torch.allclose(actual, expected, atol=atol, rtol=rtol), f"{what}: max abs diff {max_abs:.3e}, rel {rel:.3e}"


@pytest.fixture(scope="session")
def prepared_data(tmp_path_factory):
    """The bundled Shakespeare corpus prepared once per session with a 512-piece tokenizer (~4 s): the prepared
    directory itself (`<root>/<key>/`), which runs take as data.out_dir (a directory holding a manifest is reused)."""
    from pathlib import Path

    from mhc_train.config import DataConfig
    from mhc_train.data import prepare

    out = tmp_path_factory.mktemp("data") / "shakespeare_v512"
    return Path(prepare(DataConfig(out_dir=str(out), vocab_size=512))["dir"])
