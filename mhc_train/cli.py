"""`mhc-train prepare | train | compare | demo | generate | export | import-hf | eval`.

mhc-train prepare [hydra overrides]           text -> tokenizer + token shards (data.* keys)
mhc-train train [--config FILE] [overrides]   one run; e.g. connection=hc model=125m train.max_steps=1000
mhc-train compare RUN_DIR... --out DIR        plots + markdown table of several runs
mhc-train demo [--seeds 0,1 --lrs ..] [ovr]  arms x LRs x seeds of an experiment, then the comparison
mhc-train generate CKPT --prompt TEXT         sample from a checkpoint (run dir or step file; KV-cache decode)
mhc-train export CKPT --out DIR               a Hugging Face directory (AutoModelForCausalLM, trust_remote_code)
mhc-train import-hf DIR --connection ARM --out RUN  a Llama / Qwen2 / Qwen3 checkpoint as a step-0 run of any arm
mhc-train eval CKPT_OR_EXPORT --tasks T...    lm-evaluation-harness; scores into <run_dir>/eval.json
mhc-train plan [overrides] --world W [--json]  per-GPU memory of a run at W ranks, on CPU, before the launch
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import sys
import time
from pathlib import Path

DEMO_ARMS = ("residual", "hc", "mhc")  # the arms `mhc-train demo` runs by default


def _die(msg: str) -> None:
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(2)


def _load(args):
    from mhc_train.config import load_config

    return load_config(args.overrides, args.config)


def cmd_prepare(args) -> None:
    from mhc_train.config import load_config
    from mhc_train.data import prepare

    # the data part only: prepare has no sequence length, so `prepare model=test` must not trip train.seq_len's rule
    data = load_config(args.overrides, args.config, full=False).data
    if data.blend:  # each source of the blend on its own, one tokenizer (mhc_train.data.blend)
        from mhc_train.data.blend import prepare_blend

        blend, manifest = prepare_blend(data, 0, lambda value: [value])
        for label, weight, part in zip(blend.labels, blend.weights, blend.parts):
            print(f"prepared data: {label} (weight {weight:.4g}): {part.dir}")
    else:
        manifest = prepare(data)
        print(f"prepared data: {manifest['dir']} (tokenizer sha256 {manifest['tokenizer']['sha256'][:12]})")


def cmd_train(args) -> None:
    from mhc_train.io.files import atomic_write_text
    from mhc_train.io.rundir import RunDir
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
    from mhc_train.analysis import compare

    result = compare(args.run_dirs, args.out)
    print(Path(result["md"]).read_text())
    print(f"plot: {result['png']}")


def _int_list(text: str) -> list[int]:
    return [int(v) for v in text.split(",")]


def _float_list(text: str) -> list[float]:
    return [float(v) for v in text.split(",")]


def cmd_demo(args) -> None:
    """Every arm x LR x seed of an experiment, then the comparison (mhc_train.analysis.experiment)."""
    from mhc_train.analysis.experiment import run_experiment

    seeds = args.seeds if args.seeds is not None else list(range(args.n_seeds))
    command = " ".join(["mhc-train", "demo", *sys.argv[2:]])
    result = run_experiment(args.out, args.experiment, args.arms, seeds, args.lrs, args.overrides, command)
    print(Path(result["md"]).read_text())
    print(f"plot: {result['png']}\nbenchmark: {result['bench_path']}\ntotal: {result['bench']['total_wall_s']:.0f} s")


def cmd_generate(args) -> None:
    from mhc_train.infer.errors import InferenceError
    from mhc_train.infer.generate import SamplingConfig, generate
    from mhc_train.infer.load import load_checkpoint

    prompts = list(args.prompt or [])
    if args.prompts_file:
        path = Path(args.prompts_file)
        if not path.is_file():
            raise InferenceError(f"prompts file {path} does not exist; give one prompt per line")
        prompts += [line.replace("\\n", "\n") for line in path.read_text().splitlines() if line.strip()]
    if not prompts:
        raise InferenceError("no prompt: pass --prompt TEXT (repeatable) or --prompts-file FILE (one per line)")
    loaded = load_checkpoint(args.checkpoint, tokenizer=args.tokenizer)
    tok = loaded.tokenizer
    sampling = SamplingConfig(args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.seed)
    t0 = time.perf_counter()
    outs = generate(loaded.model, [tok.encode(p) for p in prompts], sampling, eos_id=tok.eos_id)
    dt = time.perf_counter() - t0
    records = [{"prompt": p, "completion": tok.decode(o), "tokens": o} for p, o in zip(prompts, outs)]
    if args.json:
        print(json.dumps(records, indent=2))
    else:
        for r in records:
            print(r["prompt"] + r["completion"])
            print("-" * 40)
    n = sum(len(o) for o in outs)
    print(f"{loaded.path} (step {loaded.step}): {n} tokens in {dt:.2f} s ({n / dt:,.1f} tokens/s)", file=sys.stderr)


def cmd_export(args) -> None:
    from mhc_train.infer.export import export
    from mhc_train.infer.load import load_checkpoint

    loaded = load_checkpoint(args.checkpoint, tokenizer=args.tokenizer)
    out = export(loaded, args.out, overwrite=args.overwrite, hc_names=args.hc_names)
    print(f"exported {loaded.path} (step {loaded.step}) to {out}")


def cmd_import_hf(args) -> None:
    from mhc_train.infer.import_hf import import_hf

    path = import_hf(args.source, args.connection, args.out, args.upcycle_skew, args.overwrite, args.format,
                     args.connection_warmup)  # fmt: skip
    run = Path(args.out)
    print(f"imported {args.source} to {path}\ncontinue: mhc-train train --config {run / 'hf_import.yaml'} "
          "data.source=YOUR_TEXT [train.* overrides]")  # fmt: skip


def cmd_eval(args) -> None:
    from mhc_train.infer.eval import checkpoint_scorer, export_scorer, run_eval, write_scores
    from mhc_train.infer.load import load_checkpoint

    target = Path(args.target)
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():  # an export
        scorer, info = export_scorer(target), json.loads((target / "config.json").read_text()).get("mhc_train", {})
        source = {"export": str(target), **info}
        ckpt_run = Path(info["checkpoint"]).resolve().parent.parent if info.get("checkpoint") else None
        run_dir = args.run_dir or (ckpt_run if ckpt_run and ckpt_run.is_dir() else target)
    else:
        loaded = load_checkpoint(target, tokenizer=args.tokenizer)
        scorer, source = checkpoint_scorer(loaded), {"checkpoint": str(loaded.path), "step": loaded.step}
        run_dir = args.run_dir or loaded.run_dir.root
    scores = run_eval(scorer, args.tasks, args.include, args.batch_size, args.limit, args.num_fewshot)
    path = write_scores(Path(run_dir), scores, source)
    print(json.dumps(scores, indent=2))
    print(f"scores: {path}")


def cmd_plan(args) -> None:
    from mhc_train.plan import format_plan, make_plan

    result = make_plan(_load(args), args.world, args.device_gib)
    print(json.dumps(result, indent=2) if args.json else format_plan(result))


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
    s = sub.add_parser("demo", help="every arm x LR x seed of an experiment, then the comparison")
    s.add_argument("--out", default="runs/demo")
    s.add_argument("--experiment", default="demo", help="configs/experiment/NAME.yaml: demo | stability | ...")
    s.add_argument("--arms", nargs="+", default=list(DEMO_ARMS), help="configs/connection names")
    s.add_argument("--n-seeds", type=int, default=3, help="seeds 0..K-1 per arm and LR (default 3)")
    s.add_argument("--seeds", type=_int_list, help="explicit seeds instead of --n-seeds, e.g. 0,1,2")
    s.add_argument("--lrs", type=_float_list, help="peak LRs to sweep, e.g. 1e-3,2e-3 (default: optim.lr)")
    s.add_argument("overrides", nargs="*")
    s.set_defaults(fn=cmd_demo)
    s = sub.add_parser("generate", help="sample from a checkpoint")
    s.add_argument("checkpoint", help="a run directory (its newest checkpoint) or a checkpoints/step_*.pt file")
    s.add_argument("--prompt", action="append", help="prompt text (repeat for a batch)")
    s.add_argument("--prompts-file", help="one prompt per line (\\n in a line is a newline)")
    s.add_argument("--max-new-tokens", type=int, default=64)
    s.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    s.add_argument("--top-k", type=int, default=0, help="0 = no top-k filter")
    s.add_argument("--top-p", type=float, default=1.0, help="1 = no nucleus filter")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--tokenizer", help="the sentencepiece model, where the run directory has none")
    s.add_argument("--json", action="store_true", help="print prompts, completions and token ids as JSON")
    s.set_defaults(fn=cmd_generate)
    s = sub.add_parser("export", help="write a Hugging Face transformers directory")
    s.add_argument("checkpoint")
    s.add_argument("--out", required=True)
    s.add_argument("--tokenizer")
    s.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    s.add_argument(
        "--hc-names",
        choices=("mhc", "deepseek"),
        default="mhc",
        help="mHC parameter names: mhc (ours, loadable by the exported modeling_mhc.py) or deepseek (DeepSeek-V4's "
        "attn_hc/ffn_hc fn, base, scale and hc_head_*, for DeepSeek-format tooling and import-hf)",
    )
    s.set_defaults(fn=cmd_export)
    s = sub.add_parser("import-hf", help="a Hugging Face Llama / Qwen2 / Qwen3 directory as a step-0 run")
    s.add_argument("source", help="a directory with config.json, *.safetensors and tokenizer.json")
    s.add_argument("--connection", help="the arm (configs/connection name); default: residual, or an export's own")
    s.add_argument("--out", required=True, help="the run directory to write")
    s.add_argument("--upcycle-skew", type=float, default=0.5, help="n-stream arms: site k's extra write share to "
                   "stream k mod n, in [0, 1) (breaks the streams' symmetry; the start is the same function)")  # fmt: skip
    s.add_argument("--connection-warmup", type=int, default=100, help="upcycled arms: steps over which the new "
                   "connection's LR ramps from 0 (optim.connection_warmup_steps; 0: none)")  # fmt: skip
    s.add_argument("--format", default="dcp", choices=("dcp", "file"), help="dcp (default): streamed, one source "
                   "shard in memory at a time; file: the whole model in one step file")  # fmt: skip
    s.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    s.set_defaults(fn=cmd_import_hf)
    s = sub.add_parser("eval", help="lm-evaluation-harness on a checkpoint or an export")
    s.add_argument("target", help="a run directory, a step file, or an export directory")
    s.add_argument("--tasks", nargs="+", required=True, help="lm-eval task names; offline: mhc_local_mc mhc_local_ppl")
    s.add_argument("--include", nargs="*", default=[], help="directories of your own lm-eval YAML tasks")
    s.add_argument("--batch-size", type=int, default=8)
    s.add_argument("--limit", type=float, default=None, help="documents per task (a fraction if < 1)")
    s.add_argument("--num-fewshot", type=int, default=None)
    s.add_argument("--run-dir", help="where eval.json goes (default: the checkpoint's run directory)")
    s.add_argument("--tokenizer")
    s.set_defaults(fn=cmd_eval)
    s = sub.add_parser("plan", help="per-GPU memory of a run at a world size (CPU, fake process group)")
    s.add_argument("--config", help="a YAML file merged on top of configs/config.yaml (same schema)")
    s.add_argument("--world", type=int, required=True, help="ranks (GPUs) the run would launch")
    s.add_argument("--device-gib", type=float, default=80.0, help="memory per GPU to fit in (default 80)")
    s.add_argument("--json", action="store_true", help="print one JSON object (per_gpu_gib, fits, world, engine)")
    s.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. model=13b parallel=fsdp train=gpu")
    s.set_defaults(fn=cmd_plan)
    args = p.parse_args(argv)
    from mhc_train.io.log import setup_logging

    # The package's log lines, by rank: on stdout for the commands that narrate (train, prepare, demo, compare); on
    # stderr for those whose stdout is their product (generate --json, export, eval print results there).
    narrate = args.cmd in ("train", "prepare", "demo", "compare")
    setup_logging(int(os.environ.get("RANK", "0")), stream=None if narrate else sys.stderr)
    from mhc_train.errors import MhcTrainError
    from mhc_train.train.errors import Preempted

    try:
        args.fn(args)
    except Preempted as e:  # a checkpoint was written: say where, exit 128 + signal (143 SIGTERM, 130 SIGINT)
        print(f"stopped: {e}", file=sys.stderr)
        shutdown_distributed()  # every rank stopped after the same step: a clean teardown, not an abort at exit
        sys.exit(e.exit_code)
    except MhcTrainError as e:  # a user error: its message names the problem and the fix; anything else is a bug
        _die(str(e))
    except OSError as e:  # disk full or over quota anywhere (config, metrics, logs): one line, not a traceback
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        where = f" writing {e.filename}" if e.filename else ""
        _die(f"no space left on the device{where} ({e.strerror}): free space there and relaunch (a run continues "
             "from its last checkpoint with checkpoint.resume=auto)")  # fmt: skip


if __name__ == "__main__":
    main()
