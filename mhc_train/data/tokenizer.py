"""A sentencepiece BPE tokenizer: train one on the corpus, or load a given `.model`."""

from __future__ import annotations

import hashlib
import io
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


class Tokenizer:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise DataError(f"tokenizer model {self.path} does not exist; set data.tokenizer_model or re-run prepare")
        self.sp = spm.SentencePieceProcessor(model_file=str(self.path))
        self.vocab_size = self.sp.get_piece_size()
        self.eos_id = self.sp.eos_id()

    def encode(self, text: str | list[str]):
        return self.sp.encode(text)

    def decode(self, ids) -> str:
        return self.sp.decode(list(map(int, ids)))
