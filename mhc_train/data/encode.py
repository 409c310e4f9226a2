"""Ordered, bounded, multi-process tokenisation.

- `ordered_map` runs a function over a stream of items in `workers` processes and yields the results in input order
  with at most `2 * workers` batches in flight, so memory stays bounded however long the stream (`Pool.imap` would
  read the whole input ahead). One worker runs in-process, with no pool.
- Workers are forked (Linux), so they start in milliseconds without re-importing torch; they run only the tokenizer,
  on one thread each (sentencepiece would otherwise start a thread per CPU in every worker).
- The tokenizer is deterministic, so the output, and the shards written from it, are the same for any worker count.
"""

from __future__ import annotations

import itertools
import multiprocessing as mp
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator

import numpy as np

from mhc_train.data.tokenizer import load_tokenizer

_worker: dict = {}  # per process: the loaded tokenizer and the shard dtype


def _init_worker(tokenizer_path: str, dtype: str) -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread per worker: the workers are the parallelism
    _worker["tok"], _worker["dtype"] = load_tokenizer(tokenizer_path, threads=1), np.dtype(dtype)


def encode_documents(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(token ids of every document followed by EOS, concatenated; each document's length including its EOS)."""
    tok, dtype = _worker["tok"], _worker["dtype"]
    ids = tok.encode_batch(texts)
    lengths = np.fromiter((len(x) + 1 for x in ids), dtype=np.int64, count=len(ids))
    eos = (tok.eos_id,)
    flat = itertools.chain.from_iterable(itertools.chain(x, eos) for x in ids)
    return np.fromiter(flat, dtype=dtype, count=int(lengths.sum())), lengths


def ordered_map(
    fn: Callable, items: Iterable, workers: int, init_args: tuple, select: Callable = lambda item: item
) -> Iterator[tuple]:
    """(item, fn(select(item))) for each item, in order, `fn` running in `workers` processes set up by
    `_init_worker(*init_args)`."""
    if workers == 1:
        _init_worker(*init_args)
        for item in items:
            yield item, fn(select(item))
        return
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    with ctx.Pool(workers, initializer=_init_worker, initargs=init_args) as pool:
        pending: deque = deque()
        for item in items:
            pending.append((item, pool.apply_async(fn, (select(item),))))
            if len(pending) >= 2 * workers:
                done, res = pending.popleft()
                yield done, res.get()
        while pending:
            done, res = pending.popleft()
            yield done, res.get()
