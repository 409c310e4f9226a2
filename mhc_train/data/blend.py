"""Weighted data blends (`data.blend`): several sources, each prepared on its own, drawn in proportion to weights.

- Each entry is prepared as a `data.source` of its own (content-addressed and reused as any prepared directory), all
  with one tokenizer: `data.tokenizer_model` when given, else a BPE trained once on a weighted sample of the sources
  (each source gives `weight` of the sampled lines and of the character budget) and kept in
  `<out_dir>/blend_tokenizers/<key>/`, the key hashing the entries, the tokenizer settings and each source's content
  digest (the one the shards' directories are named by, `store.content_digest`): edited text trains a new tokenizer.
- Weights are normalised (a notice when they do not sum to 1). A missing source is an error naming its entry: a blend
  never falls back to another prepared directory (store.py's fallback for a lone source).
- The batch of (seed, step, micro) stays a pure function: row r of global batch i = step * grad_accum + micro takes
  its source from the (i * batch_size + r)-th uniform of one PCG64 stream seeded by (seed, BLEND_STREAM) (a jump, no
  replay), and its start from the same `default_rng([seed, step, micro])` draw `TokenData.train_batch` makes (row by
  row, each with its source's length), so a one-source blend draws exactly the windows of that source alone, resume
  is bit-exact, and the realised token share of a whole run is computed up front (`token_shares`).
- Validation: each source's own fixed slice; the overall val loss is the weight-averaged per-source loss (the loss of
  the training mixture).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mhc_train.config import DataConfig
from mhc_train.config.recipe import blend_label
from mhc_train.data.agreement import prepare_agreed
from mhc_train.data.errors import DataError
from mhc_train.data.loader import TokenData
from mhc_train.data.lock import PrepareLock
from mhc_train.data.shards import split_documents
from mhc_train.data.sources import resolve_source
from mhc_train.data.store import KIND, content_digest
from mhc_train.data.tokenizer import sample_lines, train_tokenizer
from mhc_train.io.log import get_logger, progress

logger = get_logger(__name__)
BLEND_STREAM = 29  # second word of the source-choice stream's seed (any constant apart from the window draws)
TOKENIZERS = "blend_tokenizers"


@dataclass
class BlendPart:
    """One entry: its metrics label, normalised weight and the DataConfig that prepares it alone."""

    label: str
    weight: float
    cfg: DataConfig


def blend_parts(cfg: DataConfig) -> list[BlendPart]:
    """The entries of `cfg.blend` as single-source configs, weights normalised (with a notice if they were not)."""
    total = sum(e.weight for e in cfg.blend)
    if abs(total - 1.0) > 1e-9:
        logger.info(f"data.blend: the weights sum to {total:g}; normalised to sum to 1")
    parts = []
    for e in cfg.blend:
        one = dataclasses.replace(
            cfg,
            source=e.source,
            text_field=e.text_field or cfg.text_field,
            hf_config=e.hf_config or cfg.hf_config,
            hf_split=e.hf_split or cfg.hf_split,
            blend=[],
        )
        parts.append(BlendPart(blend_label(e.name, e.source), e.weight / total, one))
    return parts


def _check_sources(parts: list[BlendPart]) -> None:
    for i, p in enumerate(parts):
        c = p.cfg
        try:
            resolve_source(c.source, c.hf_split, c.text_field, c.hf_config, c.txt_per_line)
        except DataError as e:
            raise DataError(f"data.blend[{i}] ({p.label}): {e}") from e


def blend_tokenizer(cfg: DataConfig, parts: list[BlendPart]) -> str:
    """The one tokenizer of the blend: data.tokenizer_model, or the one trained on the weighted sample (built once,
    under the prepare lock, and reused)."""
    if cfg.tokenizer_model:
        return cfg.tokenizer_model
    out = Path(cfg.out_dir).expanduser()
    what = {
        "entries": [[p.cfg.source, p.cfg.text_field, p.cfg.hf_config, p.cfg.hf_split, p.weight] for p in parts],
        "tokenizer": [cfg.vocab_size, cfg.max_sentencepiece_chars, cfg.tokenizer_sample_lines, cfg.seed],
        "split": [cfg.val_fraction, cfg.txt_per_line],
        "text": [content_digest(out, _source(p.cfg)) for p in parts],  # the same name with other text: another key
    }
    key = hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:16]
    home = out / TOKENIZERS / key
    model = home / "tokenizer.model"
    if model.is_file():
        return str(model)
    home.mkdir(parents=True, exist_ok=True)
    with PrepareLock(out / ".prepare.lock"):
        if not model.is_file():
            msg = f"data.blend: training one {cfg.vocab_size}-piece tokenizer on a weighted sample of {len(parts)} sources"
            progress(logger, KIND, msg, stage="sampling", all_ranks=True)
            tmp = train_tokenizer(_weighted_sample(cfg, parts), home / ".training", cfg.vocab_size,
                                  cfg.max_sentencepiece_chars, cfg.seed)  # fmt: skip
            tmp.replace(model)
    return str(model)


def _source(c: DataConfig):
    return resolve_source(c.source, c.hf_split, c.text_field, c.hf_config, c.txt_per_line)


def _weighted_sample(cfg: DataConfig, parts: list[BlendPart]) -> list[str]:
    """Each source's share `weight` of the sampled lines and of the character budget, sources in blend order."""
    lines: list[str] = []
    for p in parts:
        c = p.cfg
        source = _source(c)
        docs = split_documents(source.documents(), c.val_fraction, c.seed)
        train = (line for _, split, doc in docs if split == "train" for line in doc.splitlines())
        budget = p.weight * cfg.max_sentencepiece_chars
        for line in sample_lines(train, max(1, round(cfg.tokenizer_sample_lines * p.weight)), cfg.seed):
            if budget <= 0:
                break
            lines.append(line)
            budget -= len(line)
    return lines


def prepare_blend(
    cfg: DataConfig, rank: int, exchange: Callable[[str], list[str]], grad_accum: int = 1
) -> tuple[BlendData, dict]:
    """Prepare every entry (each agreed across ranks, as `prepare_agreed`) with the one tokenizer; returns the blend's
    data (drawing `grad_accum` micro-batches per step) and the first entry's manifest (its tokenizer is every
    entry's)."""
    parts = blend_parts(cfg)
    _check_sources(parts)
    tokenizer = blend_tokenizer(cfg, parts)
    manifests = []
    for i, p in enumerate(parts):
        p.cfg = dataclasses.replace(p.cfg, tokenizer_model=tokenizer)
        try:
            manifests.append(prepare_agreed(p.cfg, rank, exchange))
        except DataError as e:
            raise DataError(f"data.blend[{i}] ({p.label}): {e}") from e
    tokens = [TokenData(m["dir"], verify=cfg.verify) for m in manifests]
    return BlendData([p.label for p in parts], [p.weight for p in parts], tokens, grad_accum), manifests[0]


class BlendData:
    """The `TokenData` interface over several sources: batches drawn by weight, validation per source."""

    def __init__(self, labels: list[str], weights: list[float], parts: list[TokenData], grad_accum: int = 1):
        self.labels, self.weights, self.parts = labels, np.asarray(weights, dtype=np.float64), parts
        self.grad_accum = grad_accum  # micro-batches per step: global batch index = step * grad_accum + micro
        self.edges = np.cumsum(self.weights)
        self.edges[-1] = 1.0  # rounding never leaves a uniform past the last edge
        self.manifest, self.dir = parts[0].manifest, parts[0].dir

    @property
    def vocab_size(self) -> int:
        return self.parts[0].vocab_size

    def check_compatible(self, model_vocab: int, seq_len: int, unused_rows_ok: bool = False) -> None:
        for label, part in zip(self.labels, self.parts):
            try:
                part.check_compatible(model_vocab, seq_len, unused_rows_ok)
            except DataError as e:
                raise DataError(f"data.blend source {label}: {e}") from e

    def sources(self, seed: int, index: int, batch_size: int) -> np.ndarray:
        """The source of each row of global batch `index` (= step * grad_accum + micro)."""
        bits = np.random.PCG64(np.random.SeedSequence([seed, BLEND_STREAM]))
        bits.advance(index * batch_size)
        return np.searchsorted(self.edges, np.random.Generator(bits).random(batch_size), side="right")

    def train_batch(
        self, seed: int, step: int, micro: int, batch_size: int, seq_len: int, rank: int = 0, world: int = 1
    ):
        """Rank `rank`'s rows of the global batch of (seed, step, micro) (see the module docstring)."""
        src = self.sources(seed, step * self.grad_accum + micro, batch_size)
        splits = [p.splits["train"] for p in self.parts]
        highs = np.array([len(splits[s]) - seq_len for s in src], dtype=np.int64)
        starts = np.random.default_rng([seed, step, micro]).integers(0, highs)
        per = batch_size // world
        rows = range(rank * per, (rank + 1) * per)
        block = torch.from_numpy(np.stack([splits[src[r]].read(int(starts[r]), seq_len + 1) for r in rows]))
        return block[:, :-1], block[:, 1:]

    def val_sets(self, n_batches: int, batch_size: int, seq_len: int) -> dict[str, list]:
        """Each source's fixed held-out slice, by label."""
        return {k: p.val_batches(n_batches, batch_size, seq_len) for k, p in zip(self.labels, self.parts)}

    def val_batches(self, n_batches: int, batch_size: int, seq_len: int):
        """The first source's slice (what needs one set of val batches: the diagnostics' probe)."""
        return self.parts[0].val_batches(n_batches, batch_size, seq_len)

    def unigram_entropy(self, split: str = "val") -> float:
        """The weight-averaged per-source unigram entropy (a reference line, as for one source)."""
        return float(sum(w * p.unigram_entropy(split) for w, p in zip(self.weights, self.parts)))

    def token_shares(self, seed: int, steps: int, batch_size: int, start: int = 0) -> dict[str, float]:
        """Each source's share of the training tokens of steps [start, steps): computed from the choice stream (what
        the loader draws), in chunks of a million rows."""
        bits = np.random.PCG64(np.random.SeedSequence([seed, BLEND_STREAM]))
        bits.advance(start * self.grad_accum * batch_size)
        gen, counts = np.random.Generator(bits), np.zeros(len(self.parts), dtype=np.int64)
        left = (steps - start) * self.grad_accum * batch_size
        while left > 0:
            n = min(left, 1 << 20)
            counts += np.bincount(np.searchsorted(self.edges, gen.random(n), side="right"), minlength=len(self.parts))
            left -= n
        total = max(1, int(counts.sum()))
        return {k: round(int(c) / total, 6) for k, c in zip(self.labels, counts)}
