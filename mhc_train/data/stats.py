"""Statistics of prepared token data, computed once when the shards are written and stored in the manifest.

- `unigram_entropy`: the entropy (nats/token) of a split's unigram distribution, the loss of a model that ignores
  context; the `meta` record of every run carries the val split's (`unigram_entropy`). prepare stores it in the
  manifest as `splits.val.unigram_entropy`, so a launch reads one number instead of every rank reading the whole val
  split; `TokenData.unigram_entropy` computes it with this same function for a manifest written before it was stored.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np


def unigram_entropy(arrays: Iterable[np.ndarray], vocab_size: int) -> float:
    """Entropy (nats/token) of the unigram distribution of the tokens in `arrays` (one split's shards, in order)."""
    counts = np.zeros(vocab_size, dtype=np.float64)
    for arr in arrays:
        counts += np.bincount(np.asarray(arr), minlength=vocab_size)[:vocab_size]
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())
