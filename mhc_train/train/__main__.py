"""`python -m mhc_train.train [overrides]` is `mhc-train train [overrides]`.

Also the entry for launchers: torchrun (`-m mhc_train.train`) and the DeepSpeed launcher, which appends
`--local_rank=N` (the rank also comes through the LOCAL_RANK environment variable, which is what we read).
"""

import sys

from mhc_train.cli import main

args = [a for a in sys.argv[1:] if not a.startswith(("--local_rank", "--local-rank"))]
main(["train", *args])
