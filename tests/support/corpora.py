"""Small synthetic corpora for the data tests: varied documents (several lines, inner blank lines, odd spacing,
non-ASCII, some blank) and a JSON-lines writer (plain, .gz or .zst by the file name)."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import zstandard

WORDS = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "café", "naïve", "☃", "日本"]


def make_documents(n: int, seed: int = 0) -> list[str]:
    """`n` varied documents: several lines, inner blank lines, odd spacing, non-ASCII; every 17th is blank (skipped
    by prepare)."""
    rng = np.random.default_rng(seed)
    docs = []
    for i in range(n):
        if i % 17 == 5:
            docs.append("   \n")
            continue
        lines = [" ".join(rng.choice(WORDS, rng.integers(1, 14))) for _ in range(rng.integers(1, 6))]
        docs.append(("  " if i % 3 == 0 else "") + "\n".join(lines) + ("\n\n" if i % 4 == 0 else ""))
    return docs


def write_jsonl(path: Path, docs: list[str], field: str = "text") -> Path:
    lines = "".join(json.dumps({"id": i, field: d}, ensure_ascii=False) + "\n" for i, d in enumerate(docs))
    raw = lines.encode()
    if path.name.endswith(".gz"):
        raw = gzip.compress(raw)
    elif path.name.endswith(".zst"):
        raw = zstandard.ZstdCompressor().compress(raw)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(raw)
    return path
