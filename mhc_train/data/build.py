"""Building prepared data: text -> tokenizer -> numbered token shards plus a JSON manifest, streaming, into the
content-addressed directory that store.py names and finds.

- `prepare(cfg)` is the entry: it reuses what store.py finds, else builds under the prepare lock.
- Streaming, bounded memory: documents flow from the source through the split and the tokenizer into the shards; the
  tokenizer trains on a seeded reservoir sample of `data.tokenizer_sample_lines` train lines (a first pass).
- Parallel and deterministic: `data.num_workers` processes tokenise batches of documents, written in input order, so
  the shards are byte-identical for any worker count (encode.py).
- Resumable: a build runs in `<out_dir>/.build-<key>/`; each completed shard records a resume point (`progress.json`),
  and a re-run after a kill continues from the last complete shard. The finished build is renamed to `<key>`.
- One preparer per filesystem: `prepare` holds `<out_dir>/.prepare.lock` (flock) while it looks for and builds data;
  other processes (ranks of a `train` launch, a second `mhc-train prepare`) wait on it with a progress record, then
  find the finished directory.
- The manifest carries the val split's unigram entropy (`splits.val.unigram_entropy`, stats.py), computed here once
  from the finished shards: a launch reads that number instead of every rank reading the val split.
- Progress is logged as records of kind "data.prepare" with a `stage`: waiting (lock.py), sampling, continuing,
  tokenising and wrote (every rank shows these: `all_ranks=True`), rebuilding and moved (rank 0 only).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import numpy as np

from mhc_train.config import DataConfig, validate_data
from mhc_train.data.encode import encode_documents, ordered_map
from mhc_train.data.errors import DataError
from mhc_train.data.lock import PrepareLock
from mhc_train.data.shards import ShardWriter, split_documents
from mhc_train.data.sources import TextSource
from mhc_train.data.stats import unigram_entropy
from mhc_train.data.store import (
    FORMAT_VERSION,
    KIND,
    MANIFEST,
    PROGRESS,
    TOKENIZER,
    TOKENIZER_JSON,
    emit,
    find,
    remember_digest,
    settings_key,
    with_paths,
)
from mhc_train.data.tokenizer import file_sha256, is_tokenizer_json, load_tokenizer, sample_lines, train_tokenizer
from mhc_train.io.files import atomic_write_text, fsync_dir
from mhc_train.io.log import get_logger, progress

logger = get_logger(__name__)
LOCK = ".prepare.lock"
BATCH_CHARS = 1 << 20  # characters of text per tokeniser task: large enough to amortise the transfer to a worker


def prepare(cfg: DataConfig) -> dict:
    """Build (or reuse) tokenizer, shards and manifest for `cfg`; returns the manifest, whose `dir` is the absolute
    prepared directory (give it to `TokenData`) and whose `tokenizer` holds the absolute `path` and `sha256`.

    Holds `<out_dir>/.prepare.lock` throughout: another process preparing into the same root is waited for (with a
    progress message), and its result is then found and reused."""
    validate_data(cfg)
    notes: list = []
    manifest, _ = find(cfg, notes, hash_content=False)  # the common case: unchanged input, no lock needed
    if manifest is not None:
        emit(notes)
        return manifest
    out = Path(cfg.out_dir).expanduser()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"cannot create data.out_dir={cfg.out_dir!r} ({e}); point it at a writable directory") from e
    with _prepare_lock(out) as lock:  # another process may be building this very data: wait, then look again
        notes = []
        manifest, ctx = find(cfg, notes)
        emit(notes)
        if manifest is not None:
            return manifest
        return _build(cfg, lock=lock, **ctx)


def _prepare_lock(out: Path) -> PrepareLock:
    def how_far(holder: dict) -> str:
        try:
            p = json.loads((Path(holder["building"]) / PROGRESS).read_text())
        except (KeyError, OSError, ValueError):
            return "" if "building" not in holder else "training the tokenizer"
        done = len(p["splits"]["train"]["shards"])
        return f"{p['documents']:,} documents tokenised, {done} train shard(s) complete"

    return PrepareLock(out / LOCK, how_far)


def _build(cfg, source: TextSource, out: Path, settings: dict, key: str, fp: str, digest: str, lock) -> dict:
    """Build (or continue building) `<out>/.build-<key>` and rename it to `<out>/<key>`, under the prepare lock."""
    final, build = out / key, out / f".build-{key}"
    lock.record(building=str(build))
    build.mkdir(exist_ok=True)
    try:
        manifest = _build_into(cfg, source, build, final, settings, key, fp, digest)
    except DataError:  # the input is bad: this build can never be continued
        shutil.rmtree(build, ignore_errors=True)
        raise
    # (a kill or any other error keeps the build directory: the next run continues from its last complete shard)
    (build / PROGRESS).unlink(missing_ok=True)
    fsync_dir(build)
    if final.exists():  # a damaged copy (a usable one would have been found): keep it aside, never delete it
        aside = out / f".damaged-{key}-{time.strftime('%Y%m%dT%H%M%S')}"
        os.rename(final, aside)
        progress(logger, KIND, f"prepare: moved the damaged {final} to {aside}", stage="moved")
    os.rename(build, final)
    fsync_dir(out)
    remember_digest(out, fp, digest)
    t, v = manifest["splits"]["train"], manifest["splits"]["val"]
    progress(
        logger,
        KIND,
        f"prepare: wrote {final} (train {t['tokens']:,} tokens in {len(t['shards'])} shard(s), val {v['tokens']:,} "
        f"tokens; {t['documents']:,} + {v['documents']:,} documents)",
        stage="wrote",
        all_ranks=True,
    )
    return with_paths(manifest, final)


def _documents(cfg, source: TextSource, skip: int = 0):
    """(position, split, text) of the source's non-blank documents from position `skip` on."""
    for pos, split, doc in split_documents(source.documents(), cfg.val_fraction, cfg.seed):
        if pos >= skip:
            yield pos, split, doc


def _make_tokenizer(cfg, source: TextSource, build: Path) -> Path:
    """The build's tokenizer file: a copy of data.tokenizer_model, or one trained on a seeded sample of train lines."""
    if cfg.tokenizer_model:
        given = Path(cfg.tokenizer_model).expanduser()
        path = build / (TOKENIZER_JSON if is_tokenizer_json(given) else TOKENIZER)
        load_tokenizer(given)  # fails here, naming the file, when it is not a tokenizer
        shutil.copyfile(given, path)
        return path
    progress(
        logger,
        KIND,
        f"prepare: sampling up to {cfg.tokenizer_sample_lines:,} lines to train a {cfg.vocab_size}-piece BPE tokenizer",
        stage="sampling",
        all_ranks=True,
    )
    lines = (line for _, split, doc in _documents(cfg, source) if split == "train" for line in doc.splitlines())
    sample = sample_lines(lines, cfg.tokenizer_sample_lines, cfg.seed)
    return train_tokenizer(sample, build / "tokenizer", cfg.vocab_size, cfg.max_sentencepiece_chars, cfg.seed)


def _batches(docs):
    """Groups of whole documents of about BATCH_CHARS characters: (last position + 1, splits, texts)."""
    splits, texts, size, end = [], [], 0, 0
    for pos, split, doc in docs:
        splits.append(split)
        texts.append(doc)
        size += len(doc)
        end = pos + 1
        if size >= BATCH_CHARS:
            yield end, splits, texts
            splits, texts, size = [], [], 0
    if texts:
        yield end, splits, texts


def _build_into(cfg, source, build: Path, final: Path, settings, key, fp, digest) -> dict:
    """Tokenise `source` into `build` (continuing a killed build where its progress record says), then write the
    manifest there; `final` is where the directory will live once renamed."""
    t0 = time.perf_counter()
    resume_at, tok_path = _start_or_continue(cfg, source, build, key)
    tokenizer_s = time.perf_counter() - t0
    tok = load_tokenizer(tok_path)
    dtype = np.dtype(np.uint16 if tok.vocab_size <= 1 << 16 else np.uint32)
    resume = resume_at["splits"] if resume_at else {}
    try:
        writers = {s: ShardWriter(build, s, dtype, cfg.shard_tokens, resume.get(s)) for s in ("train", "val")}
    except DataError as e:  # the files do not match the record (edited by hand?): build from the start
        progress(
            logger, KIND, f"prepare: cannot continue the build in {build} ({e}); starting it over", stage="rebuilding"
        )
        (build / PROGRESS).unlink(missing_ok=True)
        return _build_into(cfg, source, build, final, settings, key, fp, digest)
    skip = resume_at["documents"] if resume_at else 0
    t1 = time.perf_counter()
    chars = _tokenise(cfg, source, build, key, tok_path, dtype, writers, skip)
    splits = {s: w.finish() for s, w in writers.items()}
    if not splits["train"]["tokens"] or not splits["val"]["tokens"]:
        raise DataError("the input text is empty: every document is blank")
    splits["val"]["unigram_entropy"] = _unigram_entropy(build, splits["val"], dtype, tok.vocab_size)
    build_info = {  # how this build went (not part of the data: informational, for benchmarks)
        "num_workers": cfg.num_workers,
        "tokenizer_s": round(tokenizer_s, 3),
        "tokenize_s": round(time.perf_counter() - t1, 3),
        "chars_tokenised": chars,
        "resumed_at_document": skip,
    }
    manifest = _manifest(cfg, source, final, settings, key, fp, digest, tok_path, tok, dtype, splits, build_info)
    atomic_write_text(build / MANIFEST, json.dumps(manifest, indent=2))
    return manifest


def _start_or_continue(cfg, source, build: Path, key: str) -> tuple[dict | None, Path]:
    """(the progress record of a killed build to continue, or None, the tokenizer file): a build killed before its
    first record is emptied and starts over with a new tokenizer."""
    resume_at = _read_progress(build, key)
    if resume_at is None:
        for p in build.iterdir():
            p.unlink() if p.is_file() else shutil.rmtree(p)
        return None, _make_tokenizer(cfg, source, build)
    progress(
        logger,
        KIND,
        f"prepare: continuing the build in {build} after {resume_at['documents']:,} documents "
        f"({len(resume_at['splits']['train']['shards'])} complete train shard(s))",
        stage="continuing",
        all_ranks=True,
    )
    return resume_at, build / resume_at["tokenizer_file"]


def _tokenise(cfg, source, build: Path, key: str, tok_path: Path, dtype, writers: dict, skip: int) -> int:
    """Encode every document after the first `skip` into `writers`, recording a resume point whenever both splits
    are complete up to a document; returns the characters tokenised."""
    progress(
        logger,
        KIND,
        f"prepare: tokenising {source.name} with {cfg.num_workers} worker(s) into shards of {cfg.shard_tokens:,} tokens",
        stage="tokenising",
        all_ranks=True,
    )
    chars = 0
    batches = _batches(_documents(cfg, source, skip))
    for (end, splits, texts), (tokens, lengths) in ordered_map(
        encode_documents, batches, cfg.num_workers, (str(tok_path), dtype.name), select=lambda b: b[2]
    ):
        completed = _write_batch(writers, splits, tokens, lengths)
        chars += sum(map(len, texts))
        if completed:  # a resume point: both splits hold exactly the documents before `end`
            for w in writers.values():
                w.flush()
            record = {"key": key, "tokenizer_file": tok_path.name, "documents": end,
                      "splits": {s: w.state() for s, w in writers.items()}}  # fmt: skip
            atomic_write_text(build / PROGRESS, json.dumps(record))
    return chars


def _manifest(cfg, source, final: Path, settings, key, fp, digest, tok_path: Path, tok, dtype, splits, build_info):
    """The manifest of a finished build (what readers check the directory against)."""
    return {
        "format_version": FORMAT_VERSION,
        "key": key,
        "settings": settings,
        "settings_key": settings_key(settings),
        "source": source.name,
        "source_fingerprint": fp,
        "source_digest": digest,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "tokenizer": {
            "file": tok_path.name,
            "kind": tok.kind,
            "path": str((final / tok_path.name).resolve()),  # informational: readers take dir / file
            "sha256": file_sha256(tok_path),
            "vocab_size": tok.vocab_size,
            "eos_id": tok.eos_id,
        },
        "vocab_size": tok.vocab_size,
        "dtype": dtype.name,
        "shard_tokens": cfg.shard_tokens,
        "splits": splits,
        "build": build_info,
    }


def _unigram_entropy(build: Path, info: dict, dtype, vocab_size: int) -> float:
    """The split's unigram entropy, read back from the shards just written (once here, so no launch reads them)."""
    return unigram_entropy((np.memmap(build / s["file"], dtype=dtype, mode="r") for s in info["shards"]), vocab_size)


def _write_batch(writers: dict, splits: list[str], tokens: np.ndarray, lengths: np.ndarray) -> bool:
    """Write one encoded batch, each run of consecutive same-split documents in one piece."""
    ends = np.cumsum(lengths)
    completed, i, n = False, 0, len(splits)
    while i < n:
        j = i
        while j < n and splits[j] == splits[i]:
            j += 1
        lo = ends[i - 1] if i else 0
        completed |= writers[splits[i]].write(tokens[lo : ends[j - 1]], j - i)
        i = j
    return completed


def _read_progress(build: Path, key: str) -> dict | None:
    """The resume record of a killed build of this key, or None (none, or unreadable: start over)."""
    try:
        p = json.loads((build / PROGRESS).read_text())
    except (OSError, ValueError):
        return None
    if p.get("key") != key or not (build / p.get("tokenizer_file", "")).is_file():
        return None
    return p
