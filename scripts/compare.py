"""Compare runs side by side: loss curves, loss gap vs residual, grad norm, composite Amax, tokens/s, memory.

    .venv/bin/python scripts/compare.py runs/demo/residual runs/demo/hc runs/demo/mhc --out runs/demo

Writes OUT/compare.png, OUT/summary.md and OUT/summary.json. Same as `mhc-train compare`.
"""

import sys

from mhc_train.cli import main

if __name__ == "__main__":
    main(["compare", *sys.argv[1:]])
