"""Tokenizers: a sentencepiece BPE model (trained on a bounded sample of the corpus, or a given `.model`), or a given
Hugging Face `tokenizer.json` (the `tokenizers` library: reuse a GPT-2 / LLaMA-style vocabulary).

- Both expose `vocab_size`, `eos_id`, `encode_batch(texts) -> list[list[int]]`, `encode`, `decode`.
  `load_tokenizer(path)` picks the kind from the file's content (a JSON object is a `tokenizer.json`), so a copy
  under any name (a run directory's `tokenizer.model`) loads as what it is.
- The training sample is a seeded reservoir of lines (`sample_lines`): its memory is bounded whatever the corpus size,
  and the same input and seed give the same sample and the same model.
"""

from __future__ import annotations

import hashlib
import io
import json
import random
import re
from collections.abc import Iterable
from pathlib import Path

import sentencepiece as spm

from mhc_train.data.errors import DataError


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def sample_lines(lines: Iterable[str], capacity: int, seed: int) -> list[str]:
    """A uniform sample of at most `capacity` non-blank lines (reservoir sampling, Algorithm R), in stream order.
    Memory is bounded by `capacity` lines; the same stream and seed give the same sample."""
    rng, kept = random.Random(seed), []  # kept: (position in the stream, line)
    seen = 0
    for line in lines:
        line = line.strip()
        if not line:
            continue
        if len(kept) < capacity:
            kept.append((seen, line))
        else:
            j = rng.randrange(seen + 1)
            if j < capacity:
                kept[j] = (seen, line)
        seen += 1
    return [line for _, line in sorted(kept)]


def train_tokenizer(lines: Iterable[str], model_prefix: Path, vocab_size: int, max_chars: int, seed: int = 0) -> Path:
    """Train a byte-fallback BPE model on `lines`; returns the `.model` path. Deterministic for the same input."""
    text, total = [], 0
    for line in lines:
        line = line.strip()
        if line:
            text.append(line)
            total += len(line)
            if total >= max_chars:
                break
    if not text:
        raise DataError("cannot train a tokenizer: the input text is empty")
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(text),
            model_writer=model,
            model_type="bpe",
            vocab_size=vocab_size,
            character_coverage=1.0,
            byte_fallback=True,  # any byte is encodable: no <unk> on unseen characters
            # exact round trip: no Unicode normalisation, no dummy prefix, whitespace kept as is
            normalization_rule_name="identity",
            add_dummy_prefix=False,
            remove_extra_whitespaces=False,
            bos_id=-1,
            eos_id=1,
            unk_id=0,
            pad_id=-1,
            num_threads=1,  # deterministic
            minloglevel=2,
            shuffle_input_sentence=False,
        )
    except RuntimeError as e:
        raise DataError(vocab_error_message(vocab_size, str(e), truncated=total >= max_chars)) from e
    path = model_prefix.with_suffix(".model")
    path.write_bytes(model.getvalue())
    return path


VOCAB_FOLLOWS = "(the bundled data configs take data.vocab_size from model.vocab_size: setting that sets both)"


def vocab_error_message(vocab_size: int, error: str, truncated: bool = False) -> str:
    """sentencepiece's training error, read for its direction: a vocabulary too large for the text, or smaller than
    the pieces the text requires (its distinct characters, the 256 byte-fallback pieces and <unk>/EOS)."""
    if m := re.search(r"Vocabulary size too high \((\d+)\)\. Please set it to a value <= (\d+)", error):
        return (
            f"data.vocab_size={vocab_size} is too large for this text: sentencepiece can learn at most {m[2]} pieces "
            f"from it. Set data.vocab_size<={m[2]} {VOCAB_FOLLOWS}, or give more text"
            + (
                " (or raise data.max_sentencepiece_chars: the tokenizer saw only that many characters)"
                if truncated
                else ""
            )
        )
    if m := re.search(r"Vocabulary size is smaller than required_chars\. (\d+) vs (\d+)", error):
        return (
            f"data.vocab_size={vocab_size} is too small for this text: it needs at least {m[2]} pieces (its distinct "
            f"characters, 256 byte-fallback pieces, <unk> and EOS). Set data.vocab_size>={m[2]} {VOCAB_FOLLOWS}"
        )
    return f"sentencepiece could not train a {vocab_size}-piece vocabulary ({error}); change data.vocab_size"


def _missing(path: Path) -> DataError:
    return DataError(f"tokenizer {path} does not exist; set data.tokenizer_model or re-run prepare")


class Tokenizer:
    """A sentencepiece model. `threads`: the threads `encode_batch` uses (-1, sentencepiece's default: one per CPU;
    prepare's tokeniser workers take 1 each, the workers being the parallelism)."""

    kind = "sentencepiece"

    def __init__(self, path: str | Path, threads: int = -1):
        self.path = Path(path)
        if not self.path.is_file():
            raise _missing(self.path)
        self.sp = spm.SentencePieceProcessor(model_file=str(self.path), num_threads=threads)
        self.vocab_size = self.sp.get_piece_size()
        self.eos_id = self.sp.eos_id()

    def encode(self, text: str | list[str]):
        return self.sp.encode(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self.sp.encode(texts)

    def decode(self, ids) -> str:
        return self.sp.decode(list(map(int, ids)))


EOS_CANDIDATES = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<|eot_id|>")


class HFTokenizer:
    """A Hugging Face `tokenizer.json`; EOS is the first of EOS_CANDIDATES in its vocabulary (or `eos_token`)."""

    kind = "tokenizers"

    def __init__(self, path: str | Path, eos_token: str = ""):
        from tokenizers import Tokenizer as _Tokenizer

        self.path = Path(path)
        if not self.path.is_file():
            raise _missing(self.path)
        try:
            self.tok = _Tokenizer.from_file(str(self.path))
        except Exception as e:  # the Rust side raises a plain Exception for a malformed file
            raise DataError(f"{self.path} is not a Hugging Face tokenizer.json ({e}); give a valid one") from e
        self.vocab_size = self.tok.get_vocab_size(with_added_tokens=True)
        names = [eos_token] if eos_token else EOS_CANDIDATES
        ids = [self.tok.token_to_id(n) for n in names]
        found = [(n, i) for n, i in zip(names, ids) if i is not None]
        if not found:
            raise DataError(
                f"{self.path} has no end-of-text token (looked for {', '.join(names)}): documents are separated by "
                "EOS; add one to the tokenizer"
            )
        self.eos_token, self.eos_id = found[0]

    def encode(self, text: str | list[str]):
        if isinstance(text, str):
            return self.tok.encode(text, add_special_tokens=False).ids
        return self.encode_batch(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids) -> str:
        return self.tok.decode(list(map(int, ids)), skip_special_tokens=False)


def is_tokenizer_json(path: str | Path) -> bool:
    """True for a Hugging Face tokenizer.json (a JSON object), False for a sentencepiece model (protobuf)."""
    with open(path, "rb") as f:
        head = f.read(64).lstrip()
    if not head.startswith(b"{"):
        return False
    try:
        with open(path) as f:
            return isinstance(json.load(f), dict)
    except (ValueError, UnicodeDecodeError):
        return False


def load_tokenizer(path: str | Path, threads: int = -1) -> Tokenizer | HFTokenizer:
    """The tokenizer in `path`, sentencepiece or tokenizer.json, by its content. `threads` applies to sentencepiece;
    a tokenizer.json follows TOKENIZERS_PARALLELISM (false: one thread), read when it first encodes."""
    path = Path(path)
    if not path.is_file():
        raise _missing(path)
    return HFTokenizer(path) if is_tokenizer_json(path) else Tokenizer(path, threads)
