"""A sentencepiece BPE tokenizer: train one on the corpus, or load a given `.model`."""

from __future__ import annotations

import hashlib
import io
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
        raise DataError(
            f"sentencepiece could not train a {vocab_size}-piece vocabulary ({e}); lower data.vocab_size"
        ) from e
    path = model_prefix.with_suffix(".model")
    path.write_bytes(model.getvalue())
    return path


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
