"""`mhc-train prepare | train | compare | demo`.

mhc-train prepare [hydra overrides]           text -> tokenizer + token shards (data.* keys)
mhc-train train [--config FILE] [overrides]   one run; e.g. connection=hc model=125m train.max_steps=1000
mhc-train compare RUN_DIR... --out DIR        plots + markdown table of several runs
mhc-train demo [overrides]                    the three arms on the bundled corpus, then the comparison
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

DEMO_ARMS = ("residual", "hc", "mhc")


def _die(msg: str) -> None:
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(2)


def _load(args):
    from mhc_train.config import load_config

    return load_config(args.overrides, args.config)


def cmd_prepare(args) -> None:
    from mhc_train.data import prepare

    manifest = prepare(_load(args).data)
    print(f"prepared data: {manifest['dir']} (tokenizer sha256 {manifest['tokenizer']['sha256'][:12]})")


def cmd_train(args) -> None:
    from mhc_train.data.prepare import atomic_write_text
    from mhc_train.rundir import RunDir
    from mhc_train.train.trainer import train

    cfg = _load(args)
    summary = train(cfg)
    if int(os.environ.get("RANK", "0")) == 0:  # one writer under torchrun / deepspeed
        atomic_write_text(RunDir(cfg.run_dir).summary, json.dumps(summary, indent=2))
        print(json.dumps(summary, indent=2))
    shutdown_distributed()


def shutdown_distributed() -> None:
    """Tear the process group down after a successful distributed run (mhc_train.parallel.shutdown)."""
    from mhc_train.parallel import shutdown

    shutdown()


def cmd_compare(args) -> None:
    from mhc_train.compare import compare

    result = compare(args.run_dirs, args.out)
    print(Path(result["md"]).read_text())
    print(f"plot: {result['png']}")


def cmd_demo(args) -> None:
    """Each arm in its own process (fair peak-RSS numbers), same data order, seed, schedule and token budget."""
    from mhc_train.compare import compare
    from mhc_train.config import load_config
    from mhc_train.data import prepare
    from mhc_train.data.prepare import atomic_write_text

    out = Path(args.out)
    base = ["+experiment=demo", *args.overrides]
    prepare(load_config(base).data)  # once, before the arms
    run_dirs, timings = [], {}
    for arm in args.arms:
        overrides = [*base, f"connection={arm}", f"run_name={out.name}/{arm}", f"run_dir={out / arm}"]
        t0 = time.time()
        proc = subprocess.run([sys.executable, "-m", "mhc_train.cli", "train", *overrides], env=os.environ.copy())
        if proc.returncode != 0:
            _die(
                f"the {arm} arm failed (exit {proc.returncode}); its run directory is {out / arm}. Re-running "
                "`make demo` resumes every arm from its last checkpoint"
            )
        timings[arm] = time.time() - t0
        run_dirs.append(out / arm)
    result = compare(run_dirs, out)
    bench = {
        "arms": {
            r["run"]: {k: r[k] for k in ("final_val_loss", "tokens_per_s", "peak_mem_mb", "step_time_vs_residual")}
            for r in result["rows"]
        },
        "wall_s": timings,
        "unigram_entropy": result["rows"][0]["unigram_entropy"],
    }
    atomic_write_text(out / "bench.json", json.dumps(bench, indent=2))
    print(Path(result["md"]).read_text())
    print(f"plot: {result['png']}\nbenchmark: {out / 'bench.json'}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="mhc-train", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    for name, fn in (("prepare", cmd_prepare), ("train", cmd_train)):
        s = sub.add_parser(name)
        s.add_argument("--config", help="a YAML file merged on top of configs/config.yaml (same schema)")
        s.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. connection=hc train.max_steps=100")
        s.set_defaults(fn=fn)
    s = sub.add_parser("compare")
    s.add_argument("run_dirs", nargs="+")
    s.add_argument("--out", required=True)
    s.set_defaults(fn=cmd_compare)
    s = sub.add_parser("demo")
    s.add_argument("--out", default="runs/demo")
    s.add_argument("--arms", nargs="+", default=list(DEMO_ARMS))
    s.add_argument("overrides", nargs="*")
    s.set_defaults(fn=cmd_demo)
    args = p.parse_args(argv)
    from mhc_train.config import ConfigError
    from mhc_train.data.errors import DataError
    from mhc_train.train.checkpoint import CheckpointError
    from mhc_train.train.errors import Preempted, TrainingError

    try:
        args.fn(args)
    except Preempted as e:  # a checkpoint was written: say where, exit 128 + signal (143 SIGTERM, 130 SIGINT)
        print(f"stopped: {e}", file=sys.stderr)
        shutdown_distributed()  # every rank stopped after the same step: a clean teardown, not an abort at exit
        sys.exit(e.exit_code)
    except (ConfigError, DataError, CheckpointError, TrainingError) as e:
        _die(str(e))


if __name__ == "__main__":
    main()
