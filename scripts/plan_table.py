"""The README's fit table from `mhc-train plan`: every sharded preset at 7B and 13B mHC (n = 4, seq 4096) on 8, 16
and 64 GPUs of 80 GB, with the launch command of the preset that fits. Regenerate after a change to the layout,
the engines or the presets:

    .venv/bin/python scripts/plan_table.py            # prints the markdown
    .venv/bin/python scripts/plan_table.py --readme   # rewrites README.md between its plan-table markers

The logic is `mhc_train.plan.table`.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from mhc_train.plan.table import MARK_END, MARK_START, fit_rows, markdown  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--readme", action="store_true", help="rewrite README.md between the plan-table markers")
    p.add_argument("--models", default="7b,13b")
    p.add_argument("--worlds", default="8,16,64")
    args = p.parse_args()
    models, worlds = args.models.split(","), [int(w) for w in args.worlds.split(",")]
    rows = fit_rows(models, worlds)
    table = markdown(rows)
    if not args.readme:
        print(table)
        return
    path = REPO / "README.md"
    text = path.read_text()
    start, end = text.index(MARK_START) + len(MARK_START), text.index(MARK_END)
    path.write_text(text[:start] + "\n" + table + "\n" + text[end:])
    print(f"wrote the fit table into {path}")


if __name__ == "__main__":
    main()
