"""generate / export / eval: KV-cache decode equals full recompute, seeded sampling, the Hugging Face round trip (one
process and PP=2 checkpoints), AutoTokenizer, lm-eval on the bundled offline tasks, and the error messages."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mhc_train.infer.errors import InferenceError
from mhc_train.infer.eval import checkpoint_scorer, export_scorer, run_eval, write_scores
from mhc_train.infer.export import export
from mhc_train.infer.generate import Decoder, SamplingConfig, generate
from mhc_train.infer.load import Loaded, find_tokenizer, load_checkpoint
from tests.support import launch
from tests.support.configs import ALL_ARMS, decode_model, run_overrides
from tests.support.numerics import assert_close

GREEDY = SamplingConfig(max_new_tokens=8, stop_at_eos=False)


@pytest.mark.parametrize("arm, native", [(arm, True) for arm in ALL_ARMS] + [("mhc", False)])
def test_kv_cache_decode_equals_full_recompute(arm, native):
    model = decode_model(arm)
    tokens = torch.randint(0, 256, (2, 21))
    with torch.no_grad():
        full = model(tokens)  # [B, T, V]
    dec = Decoder(model, native)  # native: mHC's Sinkhorn as the C loop (False: torch ops)
    cache = dec.new_cache(2, 21)
    steps = [dec.forward(tokens[:, :6], cache, all_logits=True)]
    steps += [dec.forward(tokens[:, t : t + 1], cache, all_logits=True) for t in range(6, 21)]
    assert_close(torch.cat(steps, 1), full, atol=1e-5, what=f"{arm} cached vs full logits")


@pytest.mark.parametrize("arm", ["residual", "mhc"])
def test_batched_prompts_of_different_lengths_equal_one_at_a_time(arm):
    model = decode_model(arm)
    prompts = [list(range(3, 15)), [7, 9, 11], list(range(40, 47))]
    batched = generate(model, prompts, GREEDY)
    assert batched == [generate(model, [p], GREEDY)[0] for p in prompts]


def test_sampling_is_reproducible_from_a_seed():
    model = decode_model("mhc")
    prompts = [[5, 6, 7], [1, 2]]
    cfg = dict(max_new_tokens=12, temperature=1.5, top_k=50, top_p=0.95, stop_at_eos=False)
    a = generate(model, prompts, SamplingConfig(**cfg, seed=3))
    assert a == generate(model, prompts, SamplingConfig(**cfg, seed=3))
    assert a != generate(model, prompts, SamplingConfig(**cfg, seed=4))
    assert all(len(r) == 12 for r in a)


def test_a_prompt_longer_than_the_context_is_refused():
    model = decode_model("mhc")  # max_seq_len 64
    with pytest.raises(InferenceError, match=r"exceeds the model's context of 64 tokens.*at most 56"):
        generate(model, [list(range(60))], GREEDY)


@pytest.fixture(scope="module")
def tokenizer(prepared_data):
    from mhc_train.data.tokenizer import Tokenizer

    return Tokenizer(prepared_data / "tokenizer.model")


def _roundtrip(loaded: Loaded, out: Path):
    from transformers import AutoModelForCausalLM

    d = export(loaded, out)
    hf = AutoModelForCausalLM.from_pretrained(d, trust_remote_code=True).eval()
    tokens = torch.randint(0, loaded.model.cfg.vocab_size, (2, 33))
    with torch.no_grad():
        assert_close(hf(tokens).logits, loaded.model(tokens), atol=1e-5, what="export logits")
    ids = loaded.tokenizer.encode("HAMLET. To be, or not")
    ours = generate(loaded.model, [ids], GREEDY)[0]
    theirs = hf.generate(torch.tensor([ids]), max_new_tokens=8, min_new_tokens=8, do_sample=False)
    assert theirs[0, len(ids) :].tolist() == ours
    return d


@pytest.mark.parametrize("arm", list(ALL_ARMS))
def test_export_round_trip_logits_and_greedy_tokens(arm, tokenizer, tmp_path):
    model = decode_model(arm, vocab_size=512, tie_embeddings=arm == "residual")
    _roundtrip(Loaded(model, tokenizer, {}, tmp_path / "step.pt", 0), tmp_path / "hf")


def test_autotokenizer_from_the_export_encodes_like_ours(tokenizer, tmp_path):
    from transformers import AutoTokenizer

    d = export(Loaded(decode_model("residual", vocab_size=512), tokenizer, {}, tmp_path / "s.pt", 0), tmp_path / "hf")
    hf_tok = AutoTokenizer.from_pretrained(d, trust_remote_code=True)
    text = "KING LEAR.\n  Nothing will come of nothing: speak again.\tcafé — naïve ✓ 1234"
    ids = tokenizer.encode(text)
    assert hf_tok(text)["input_ids"] == ids
    assert hf_tok.decode(ids) == text == tokenizer.decode(ids)
    assert hf_tok.eos_token_id == tokenizer.eos_id


@pytest.fixture(scope="module")
def pp_run(prepared_data, tmp_path_factory):
    """A 2-step mHC run under PP=2 (1F1B, 2 gloo ranks): its checkpoint is DCP shards of two stages."""
    run = tmp_path_factory.mktemp("pp") / "mhc_pp2"
    over = run_overrides(
        prepared_data, run, connection="mhc", **{"model.n_layer": 4, "train.max_steps": 2, "train.batch_size": 8}
    )
    over += ["parallel.pp=2", "parallel.pp_schedule=1f1b", "checkpoint.every=0", "train.threads=1"]
    proc = subprocess.run(
        launch.torchrun_cmd(over), cwd=launch.REPO, env=launch.env(), capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return run


@pytest.mark.slow
def test_pp2_checkpoint_loads_exports_and_generates(pp_run, tmp_path):
    loaded = load_checkpoint(pp_run)
    assert loaded.step == 2 and loaded.config["parallel"]["pp"] == 2
    assert (pp_run / "checkpoints" / "dcp").is_dir()  # the weights came from the stages' DCP shards
    _roundtrip(loaded, tmp_path / "hf")
    out = subprocess.run(
        [sys.executable, "-m", "mhc_train.cli", "generate", str(pp_run), "--prompt", "To be", "--max-new-tokens", "5"]
        + ["--json"],
        cwd=launch.REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    (rec,) = json.loads(out.stdout)
    assert rec["tokens"] == generate(loaded.model, [loaded.tokenizer.encode("To be")], SamplingConfig(5))[0]


@pytest.mark.slow
def test_a_checkpoint_without_a_tokenizer_is_refused(pp_run, tmp_path):
    run = tmp_path / "copied"
    shutil.copytree(pp_run / "checkpoints", run / "checkpoints")  # no tokenizer.model in the copy
    step = sorted((run / "checkpoints").glob("step_*.pt"))[-1]
    with pytest.raises(InferenceError, match=r"has no tokenizer.*--tokenizer PATH"):
        find_tokenizer(step, {"path": str(tmp_path / "gone" / "tokenizer.model")})
    with pytest.raises(InferenceError, match="is not the one checkpoint"):
        find_tokenizer(step, {"sha256": "0" * 64}, given=pp_run / "tokenizer.model")


@pytest.mark.slow  # lm-evaluation-harness end to end (its import alone is ~10 s)
def test_eval_on_local_tasks_scores_the_model_and_feeds_compare(tokenizer, tmp_path):
    from mhc_train.analysis import load_run, summary_rows

    tasks = ["mhc_local_mc", "mhc_local_ppl"]
    scores = []
    for seed in (1, 2):
        model = decode_model("mhc", seed=seed, vocab_size=512)
        scores.append(run_eval(checkpoint_scorer(Loaded(model, tokenizer, {}, tmp_path / "s.pt", 0)), tasks))
    a, b = scores
    assert 0.0 <= a["mhc_local_mc"]["acc"] <= 1.0
    assert a["mhc_local_ppl"]["word_perplexity"] > 1.0
    assert a["mhc_local_ppl"]["word_perplexity"] != b["mhc_local_ppl"]["word_perplexity"]  # not a constant
    # an export scores the same as its checkpoint
    loaded = Loaded(decode_model("mhc", seed=1, vocab_size=512), tokenizer, {}, tmp_path / "s.pt", 0)
    via_export = run_eval(export_scorer(export(loaded, tmp_path / "hf")), tasks)
    for task in tasks:
        for metric, value in a[task].items():
            assert via_export[task][metric] == pytest.approx(value, rel=1e-5), (task, metric)
    run = tmp_path / "run"  # compare reads <run>/eval.json, as `mhc-train eval` wrote it, into its table
    write_scores(run, a, {"checkpoint": "x", "step": 0})
    (run / "metrics.jsonl").write_text("")  # a run directory (no training records needed here)
    (row,) = summary_rows([load_run(run)])
    assert row["mhc_local_mc/acc"] == a["mhc_local_mc"]["acc"]
    assert row["mhc_local_ppl/word_perplexity"] == a["mhc_local_ppl"]["word_perplexity"]


@pytest.mark.slow  # lm-evaluation-harness end to end (its import alone is ~10 s)
def test_an_unknown_task_is_refused(tokenizer, tmp_path):
    scorer = checkpoint_scorer(Loaded(decode_model("residual", vocab_size=512), tokenizer, {}, tmp_path / "s.pt", 0))
    with pytest.raises(InferenceError, match=r"unknown lm-eval task\(s\): no_such_task.*mhc_local_mc"):
        run_eval(scorer, ["no_such_task"])
