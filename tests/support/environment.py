"""The test environment, set before anything imports triton or the hub: offline everywhere (a hub name otherwise
hangs ~23 s without internet; wandb needs no account offline) and Triton kernels through the interpreter on a
machine without a GPU. tests/conftest.py applies it; scripts under tests/ that run outside pytest call it first."""

import os


def apply() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("WANDB_SILENT", "true")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not (os.environ.get("CUDA_VISIBLE_DEVICES", "") != "" or os.path.exists("/dev/nvidia0")):
        os.environ.setdefault("TRITON_INTERPRET", "1")  # on a GPU machine the kernels compile for real
