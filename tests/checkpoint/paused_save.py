"""`python -m tests.checkpoint.paused_save SECONDS train <overrides...>`: the CLI, with a pause after each step file's
temporary is complete and before it is renamed into place, so a test can kill a run in the middle of a checkpoint
write. The pause is patched in here, from the test side; the product has no seam for it."""

from __future__ import annotations

import sys
import time

from mhc_train.checkpoint import integrity


def main() -> None:
    pause, argv = float(sys.argv[1]), sys.argv[2:]
    append_footer = integrity.append_footer

    def then_pause(path):  # the last thing before the rename (mhc_train.checkpoint.stepfile.write_step_file)
        append_footer(path)
        time.sleep(pause)

    integrity.append_footer = then_pause
    from mhc_train.cli import main as cli

    cli(argv)


if __name__ == "__main__":
    main()
