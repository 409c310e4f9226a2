"""`python -m tests.support.chunked_train [overrides]` (under torchrun: `launch.torchrun(..., module=MODULE)`):
`python -m mhc_train.train` with the loss forced into chunks of `TOKENS` tokens (`model.chunked_lm_loss`; test models
never split at the default size), and at exit rank 0 prints `chunked loss: <n> chunks`, so a test knows the split
path ran."""

from __future__ import annotations

import atexit
import os
import runpy

from mhc_train.model import transformer

MODULE = "tests.support.chunked_train"
TOKENS = 8


def main() -> None:
    chunks = [0]
    ce_sum = transformer._ce_sum

    def counting_ce_sum(head, h, targets):
        chunks[0] += 1
        return ce_sum(head, h, targets)

    transformer._ce_sum = counting_ce_sum
    transformer.LOSS_CHUNK_ELEMENTS = TOKENS * 512  # the test model's vocabulary
    if os.environ.get("RANK", "0") == "0":
        atexit.register(lambda: print(f"chunked loss: {chunks[0]} chunks", flush=True))
    runpy.run_module("mhc_train.train", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
