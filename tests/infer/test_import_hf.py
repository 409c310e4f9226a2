"""import-hf: tiny random Llama 3 (rope_scaling llama3), Qwen2 (tied embeddings, qkv bias) and Qwen3 (q/k norm)
models built with transformers' own classes and saved sharded (no download) -> imported -> logits equal the source's
(residual, fp32, 1e-5) and every upcycled arm starts as the same function -> 3 training steps -> export ->
AutoModelForCausalLM and AutoModel load with the same logits -> import-hf on that export gives them back."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from mhc_train.infer.import_hf import converted_shards, import_hf, read_hf_config, to_halves, to_pairs
from mhc_train.infer.load import load_checkpoint
from tests.support.numerics import assert_close

VOCAB = 96  # tokenizer pieces; the models have 4 more embedding rows (padded, as Qwen's)
SHAPE = dict(vocab_size=VOCAB + 4, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64)  # fmt: skip
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16}  # fmt: skip
# family -> (the upcycled arm it checks, bound of that arm's starting logit gap to the source at this tiny size)
FAMILIES = {"llama3": ("hc", 1e-5), "qwen2": ("mhc", 2e-3), "qwen3": ("mhc_identity", 2e-3)}


def write_tokenizer(directory: Path) -> None:
    """A word-level tokenizer.json: t0 .. t94 and <|endoftext|> (the EOS mhc-train looks for)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"t{i}": i for i in range(VOCAB - 1)} | {"<|endoftext|>": VOCAB - 1}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(directory / "tokenizer.json"))


def hf_model(family: str, directory: Path):
    """A random model of `family` saved in shards of ~20 KB, its 1-D weights (norm gains, biases) moved off 1 and 0."""
    import transformers

    torch.manual_seed(0)
    if family == "llama3":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**SHAPE, rope_scaling=LLAMA3_ROPE))
    elif family == "qwen2":
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**SHAPE, tie_word_embeddings=True))
    else:
        model = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**SHAPE, head_dim=16))
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(directory, max_shard_size="20KB")
    write_tokenizer(directory)
    return model.eval()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    rng = random.Random(0)
    path = tmp_path_factory.mktemp("corpus") / "words.txt"
    path.write_text("\n".join(" ".join(f"t{rng.randrange(VOCAB - 1)}" for _ in range(40)) for _ in range(60)))
    return path


def logits(model, tokens):
    with torch.no_grad():
        out = model(tokens)
    return (out.logits if hasattr(out, "logits") else out).float()


def train_three_steps(run: Path, corpus: Path, data: Path) -> None:
    from mhc_train.config import load_config
    from mhc_train.train.trainer import train

    overrides = [f"data.source={corpus}", "data.txt_per_line=true", f"data.out_dir={data}", "train.max_steps=3",
                 "train.batch_size=2", "train.seq_len=16", "train.eval_every=3", "train.eval_batches=1",
                 "train.diag_every=0", "logging.wandb=false", "train.progress=false", "train.device=cpu",
                 "checkpoint.every=0"]  # fmt: skip
    train(load_config(overrides, str(run / "hf_import.yaml")))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_import_train_export_round_trip(family, corpus, tmp_path, monkeypatch):
    from transformers import AutoModel, AutoModelForCausalLM

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    src = tmp_path / "hf"
    source = hf_model(family, src)
    tokens = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))
    want = logits(source, tokens)

    # shard by shard: each converted batch is exactly one source shard's tensors (rotary buffers aside)
    hf = read_hf_config(src)
    index = json.loads((src / "model.safetensors.index.json").read_text())["weight_map"]
    shards = [(path.name, len(t)) for path, t in converted_shards(src, hf, hf.get("head_dim") or 8)]
    assert len(shards) > 2 and all(n == sum(v == name for v in index.values()) for name, n in shards)

    fmt = "file" if family == "qwen2" else "dcp"  # dcp: streamed, one DCP part written per source shard
    residual = load_checkpoint(import_hf(src, "residual", tmp_path / "residual", fmt=fmt))
    if fmt == "dcp":
        written = {f.name.split("_")[3] for f in (tmp_path / "residual/checkpoints/dcp").rglob("*.distcp")}
        assert len(written) == len(shards), (written, shards)
    assert_close(logits(residual.model, tokens), want, atol=1e-5, what=f"{family} residual vs transformers")

    arm, bound = FAMILIES[family]
    run = tmp_path / arm
    upcycled = load_checkpoint(import_hf(src, arm, run, fmt=fmt)).model
    gap = (logits(upcycled, tokens) - want).abs().max().item()
    print(f"{family} {arm}: starting logit gap {gap:.3g}")
    assert gap < bound, f"{arm} does not start as the source's function: gap {gap}"
    if arm != "hc":  # mHC sums n streams of the residual into the final RMSNorm: exact under eps / n^2
        n = upcycled.n_streams
        source.model.norm.variance_epsilon = source.config.rms_norm_eps / n**2
        assert_close(logits(upcycled, tokens), logits(source, tokens), atol=1e-5, what=f"{arm} vs eps / n^2")
        source.model.norm.variance_epsilon = source.config.rms_norm_eps
    streams = upcycled.run_blocks(upcycled.embed(tokens))  # [B, T, n, C]: the symmetry is broken
    assert streams.std(dim=-2).max() > 1e-3  # the streams are not n copies

    from omegaconf import OmegaConf

    warmups = {
        r: OmegaConf.load(tmp_path / r / "hf_import.yaml").optim.connection_warmup_steps for r in ("residual", arm)
    }
    assert warmups == {"residual": 0, arm: 100}  # the upcycled connection's LR warms up (optim.connection_*)
    train_three_steps(run, corpus, tmp_path / "data")
    trained = load_checkpoint(run)
    assert trained.step == 3
    assert (logits(trained.model, tokens) - logits(upcycled, tokens)).abs().max() > 1e-6  # it learned

    from mhc_train.infer.export import export

    exported = export(trained, tmp_path / "export")
    ours = logits(trained.model, tokens)
    hf_lm = AutoModelForCausalLM.from_pretrained(exported, trust_remote_code=True).eval()
    assert_close(logits(hf_lm, tokens), ours, atol=1e-5, what=f"{family} export (AutoModelForCausalLM)")
    base = AutoModel.from_pretrained(exported, trust_remote_code=True).eval()
    with torch.no_grad():
        assert_close(hf_lm.lm_head(base(tokens).last_hidden_state), ours, atol=1e-5, what="AutoModel + head")

    back = load_checkpoint(import_hf(exported, None, tmp_path / "back"))
    assert back.model.conn_cfg.type == trained.model.conn_cfg.type
    assert_close(logits(back.model, tokens), ours, atol=1e-5, what=f"{family} import-hf of our own export")


def test_rope_layout_permutation_round_trips():
    w = torch.arange(2 * 8 * 3, dtype=torch.float32).view(16, 3)  # 2 heads of 8, 3 channels
    pairs = to_pairs(w, 8)
    assert pairs[:4, 0].tolist() == [0.0, 12.0, 3.0, 15.0]  # rows 0, 4, 1, 5 of head 0: (x_i, x_{i+D/2}) adjacent
    assert torch.equal(to_halves(pairs, 8), w)


def test_what_the_model_cannot_hold_is_refused(tmp_path):
    from mhc_train.infer.errors import InferenceError
    from mhc_train.infer.import_hf import model_overrides

    base = {"architectures": ["LlamaForCausalLM"], "num_attention_heads": 4, "hidden_size": 32}
    with pytest.raises(InferenceError, match="rope type 'yarn' is not supported"):
        model_overrides({**base, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}})
    with pytest.raises(InferenceError, match="attention_bias=true"):
        model_overrides({**base, "attention_bias": True})
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(InferenceError, match="GPT2LMHeadModel is not importable"):
        read_hf_config(tmp_path)
