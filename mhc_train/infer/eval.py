"""lm-evaluation-harness (`lm-eval`) on an mhc-train checkpoint or an export, with the scores kept in the run directory.

- `MHCEvalLM` is an `lm_eval.api.model.LM` over any `tokens [B, T] -> logits [B, T, V]` function: our plain model for
  a checkpoint, `AutoModelForCausalLM` (trust_remote_code) for an export, so both go through the same harness code.
  loglikelihood follows lm-eval's HF model: trailing context spaces move to the continuation, the continuation's
  tokens are those of `encode(context + continuation)` past the context's, an empty context is prefixed with EOS
  (there is no BOS), inputs are cut to the last max_seq_len tokens. loglikelihood_rolling uses lm-eval's disjoint
  rolling windows; generate_until decodes greedily with the KV cache (`generate.py`) and cuts at the stop strings.
- Tasks: any lm-eval task name, plus the bundled offline tasks in `tasks/` (`mhc_local_mc`, a multiple-choice YAML
  task over a local JSON file, and `mhc_local_ppl`, a perplexity task over a local text file), plus `--include DIR`.
- Scores go to `<run_dir>/eval.json` ({task: {metric: value}}, merged with earlier tasks); `mhc-train compare` puts
  them in its table next to val loss.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from mhc_train.infer.errors import InferenceError
from mhc_train.infer.generate import SamplingConfig, generate

TASKS_DIR = Path(__file__).parent / "tasks"
BUNDLED_TASKS = ("mhc_local_mc", "mhc_local_ppl")
EVAL_FILE = "eval.json"


class Scorer:
    """What the harness needs of a model: encode/decode, EOS, context length, logits and greedy continuation."""

    def __init__(self, logits_fn, encode, decode, eos_id, max_len, continue_fn):
        self.logits_fn: Callable[[torch.Tensor], torch.Tensor] = logits_fn
        self.encode, self.decode = encode, decode
        self.eos_id, self.max_len = eos_id, max_len
        self.continue_fn: Callable[[list[int], int], list[int]] = continue_fn


def checkpoint_scorer(loaded) -> Scorer:
    model, tok = loaded.model, loaded.tokenizer

    def cont(ids, max_new):
        return generate(model, [ids], SamplingConfig(max_new_tokens=max_new), eos_id=tok.eos_id)[0]

    return Scorer(model, tok.encode, tok.decode, tok.eos_id, model.cfg.max_seq_len, cont)


def export_scorer(path: Path) -> Scorer:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=True)

    def cont(ids, max_new):
        out = model.generate(torch.tensor([ids]), max_new_tokens=max_new, do_sample=False)
        return out[0, len(ids) :].tolist()

    return Scorer(
        lambda t: model(t).logits,
        lambda s: tok(s, add_special_tokens=False)["input_ids"],
        tok.decode,
        tok.eos_token_id,
        model.config.max_position_embeddings,
        cont,
    )


def make_lm(scorer: Scorer, batch_size: int = 8):
    from lm_eval.api.model import LM
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    class MHCEvalLM(LM):
        def _score(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
            """(context ids, continuation ids) -> (sum log p(continuation), whether greedy decoding gives it)."""
            out = []
            for i in range(0, len(pairs), batch_size):
                chunk = pairs[i : i + batch_size]
                inputs = [(ctx + cont)[-(scorer.max_len + 1) :][:-1] for ctx, cont in chunk]
                width = max(map(len, inputs))
                batch = torch.tensor([x + [0] * (width - len(x)) for x in inputs])  # right padding: causal, exact
                with torch.inference_mode():
                    logp = F.log_softmax(scorer.logits_fn(batch).float(), dim=-1)  # [B, T, V]
                for row, (x, (_, cont)) in enumerate(zip(inputs, chunk)):
                    sl = logp[row, len(x) - len(cont) : len(x)]  # [len(cont), V]
                    target = torch.tensor(cont)
                    ll = torch.take_along_dim(sl, target[:, None], dim=-1).sum().item()
                    out.append((ll, bool((sl.argmax(-1) == target).all())))
            return out

        def loglikelihood(self, requests):
            pairs = []
            for req in requests:
                context, continuation = req.args
                n_spaces = len(context) - len(context.rstrip())
                if n_spaces:
                    context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
                whole = scorer.encode(context + continuation)
                ctx = scorer.encode(context) if context else []
                cont = whole[len(ctx) :]
                if not ctx:
                    ctx = [scorer.eos_id]
                pairs.append((ctx, cont))
            return self._score(pairs)

        def loglikelihood_rolling(self, requests):
            results = []
            for req in requests:
                (text,) = req.args
                windows = [
                    make_disjoint_window(w)
                    for w in get_rolling_token_windows(scorer.encode(text), scorer.eos_id, scorer.max_len, 1)
                ]
                results.append(sum(ll for ll, _ in self._score(windows)))
            return results

        def generate_until(self, requests):
            results = []
            for req in requests:
                context, kwargs = req.args
                until = kwargs.get("until") or []
                until = [until] if isinstance(until, str) else list(until)
                max_new = min(int(kwargs.get("max_gen_toks", 64)), scorer.max_len - 1)  # room for one context token
                ids = scorer.encode(context)[-(scorer.max_len - max_new) :]
                text = scorer.decode(scorer.continue_fn(ids, max_new))
                for stop in until:
                    text = text.split(stop)[0]
                results.append(text)
            return results

    return MHCEvalLM()


def _task_manager(tasks: list[str], include: list[str]):
    from lm_eval.tasks import TaskManager

    paths = [str(TASKS_DIR), *include]
    bundled_only = all(t in BUNDLED_TASKS for t in tasks) and not include
    manager = TaskManager(include_path=paths, include_defaults=not bundled_only)
    known = set(manager.all_tasks)
    unknown = [t for t in tasks if t not in known]
    if unknown:
        raise InferenceError(
            f"unknown lm-eval task(s): {', '.join(unknown)}. Bundled offline tasks: {', '.join(BUNDLED_TASKS)}; "
            f"lm-eval {_lm_eval_version()} knows {len(known)} names (list them with `lm-eval ls tasks`); "
            "your own YAML tasks: --include DIR"
        )
    return manager


def _lm_eval_version() -> str:
    from importlib.metadata import version

    return version("lm_eval")


def clean_results(results: dict) -> dict:
    """lm-eval's {task: {"acc,none": v, "acc_stderr,none": v, "alias": ...}} -> {task: {"acc": v, "acc_stderr": v}}."""
    out = {}
    for task, metrics in results.items():
        out[task] = {k.split(",")[0]: float(v) for k, v in metrics.items() if "," in k and isinstance(v, (int, float))}
    return out


def run_eval(scorer: Scorer, tasks: list[str], include=(), batch_size=8, limit=None, num_fewshot=None, seed=0):
    """Evaluate; returns {task: {metric: value}}."""
    if not tasks:
        raise InferenceError("no tasks given; e.g. --tasks mhc_local_mc mhc_local_ppl (or hellaswag piqa ...)")
    from lm_eval import simple_evaluate

    manager = _task_manager(list(tasks), list(include))
    try:
        out = simple_evaluate(
            model=make_lm(scorer, batch_size),
            tasks=list(tasks),
            num_fewshot=num_fewshot,
            limit=limit,
            task_manager=manager,
            log_samples=False,
            bootstrap_iters=0,
            random_seed=seed,
            numpy_random_seed=seed,
            torch_random_seed=seed,
            fewshot_random_seed=seed,
        )
    except Exception as e:
        if (cause := _unreachable(e)) is None:
            raise
        raise InferenceError(
            f"tasks {' '.join(tasks)}: a dataset had to come from the Hugging Face Hub, which could not be reached "
            f"({type(cause).__name__}: {str(cause)[:200]}); run once online to cache it, or evaluate offline with "
            f"--tasks {' '.join(BUNDLED_TASKS)} or tasks of your own (--include DIR)"
        ) from None
    return clean_results(out["results"])


def _unreachable(e: BaseException) -> BaseException | None:
    """The network failure behind `e` (a ConnectionError of datasets / huggingface_hub / requests, anywhere in
    its chain of causes), or None for anything else."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        names = {c.__name__ for c in type(e).__mro__}
        if isinstance(e, ConnectionError) or names & {
            "ConnectionError",
            "OfflineModeIsEnabled",
            "LocalEntryNotFoundError",
        }:
            return e
        e = e.__cause__ or e.__context__
    return None


def write_scores(run_dir: Path, scores: dict, source: dict) -> Path:
    """Merge `scores` into `<run_dir>/eval.json` (a task evaluated again replaces its old entry)."""
    from mhc_train.io.files import atomic_write_text

    Path(run_dir).mkdir(parents=True, exist_ok=True)
    path = Path(run_dir) / EVAL_FILE
    record = json.loads(path.read_text()) if path.is_file() else {"tasks": {}}
    for task, metrics in scores.items():
        record["tasks"][task] = {"metrics": metrics, **source, "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
    atomic_write_text(path, json.dumps(record, indent=2) + "\n")
    return path
