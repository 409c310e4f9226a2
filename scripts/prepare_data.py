"""Tokenize text into shards: `.venv/bin/python scripts/prepare_data.py data.source=/path/to/texts data.vocab_size=8192`.

Same as `mhc-train prepare [overrides]`; see configs/data/ for the keys.
"""

import sys

from mhc_train.cli import main

if __name__ == "__main__":
    main(["prepare", *sys.argv[1:]])
