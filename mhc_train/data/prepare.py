"""Text -> tokenizer -> numbered token shards plus a JSON manifest, in a content-addressed directory, streaming.

`data.out_dir` is a root: each prepared output lives in `<out_dir>/<key>/`, where the key hashes the source's content
digest and every data setting that changes the output (tokenizer: the given file's sha256, or vocab_size,
max_sentencepiece_chars and tokenizer_sample_lines; val_fraction; seed; text_field; txt_per_line; shard_tokens; the
shard format). A directory holds the tokenizer (`tokenizer.model`, or `tokenizer.json` when one was given), the shards
`train_00000.bin`, ... and `val_00000.bin`, ... (uint16 when the vocabulary fits, else uint32; documents joined with
EOS; see shards.py) and `manifest.json` (per-shard token counts and sha256). Nothing is ever rebuilt in place:
editing the source gives a new key and a new directory, and the tokenizer and shards that checkpoints name stay.

- Streaming, bounded memory: documents flow from the source through the split and the tokenizer into the shards; the
  tokenizer trains on a seeded reservoir sample of `data.tokenizer_sample_lines` train lines (a first pass).
- Parallel and deterministic: `data.num_workers` processes tokenise batches of documents, written in input order, so
  the shards are byte-identical for any worker count (encode.py).
- Resumable: a build runs in `<out_dir>/.build-<key>/`; each completed shard records a resume point (`progress.json`),
  and a re-run after a kill continues from the last complete shard. The finished build is renamed to `<key>`.
- One preparer per filesystem: `prepare` holds `<out_dir>/.prepare.lock` (flock) while it looks for and builds data;
  other processes (ranks of a `train` launch, a second `mhc-train prepare`) wait on it with a progress message, then
  find the finished directory.
- Reuse is cheap: a prepared directory whose manifest has the same settings and the same source fingerprint (paths,
  sizes, mtimes) is returned without reading the text. Otherwise the content is hashed (remembered per fingerprint in
  `<out_dir>/.source_digests.json`), so touched, copied or moved but unchanged text still finds its directory.
- A missing local source (or bundled corpus package) falls back to the newest prepared directory with the same
  settings, with a one-line notice; none gives a DataError naming the source and the fix.
- An `out_dir` that itself holds a `manifest.json` is a candidate like its subdirectories: an older flat output is
  reused while its input is unchanged (new outputs then go into keyed subdirectories of it, the flat files left as
  they are); a keyed directory named directly (`data.out_dir=<root>/<key>`, e.g. where a checkpoint's tokenizer
  lives) with the same settings is used as it is, with a notice when the source changed or is missing.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mhc_train.config import DataConfig, validate_data
from mhc_train.data.encode import encode_documents, ordered_map
from mhc_train.data.errors import DataError, SourceMissing
from mhc_train.data.lock import PrepareLock
from mhc_train.data.shards import ShardWriter, split_documents, verify_shards
from mhc_train.data.sources import TextSource, resolve_source
from mhc_train.data.tokenizer import file_sha256, is_tokenizer_json, load_tokenizer, sample_lines, train_tokenizer
from mhc_train.io.files import atomic_write_text, fsync_dir

FORMAT_VERSION = 3  # bump when tokenizer training or shard layout changes: a new key, so a new directory
MANIFEST = "manifest.json"
TOKENIZER = "tokenizer.model"
TOKENIZER_JSON = "tokenizer.json"
PROGRESS = "progress.json"  # a build's resume point
LOCK = ".prepare.lock"
BATCH_CHARS = 1 << 20  # characters of text per tokeniser task: large enough to amortise the transfer to a worker
DIGEST_CACHE = ".source_digests.json"  # source fingerprint -> content digest, so a touched file is hashed once


# ---- keys --------------------------------------------------------------------------------------------------------
def _tokenizer_setting(cfg: DataConfig) -> str:
    """The tokenizer part of the key: the given model's sha256, or what trains one."""
    if cfg.tokenizer_model:
        path = Path(cfg.tokenizer_model).expanduser()
        if not path.is_file():
            raise DataError(
                f"data.tokenizer_model={cfg.tokenizer_model!r} does not exist: give an existing sentencepiece .model "
                "or Hugging Face tokenizer.json, "
                "or leave it empty to train one on the text"
            )
        return file_sha256(path)
    return f"train:{cfg.vocab_size}:{cfg.max_sentencepiece_chars}"


def data_settings(cfg: DataConfig) -> dict:
    """Every data setting besides the source that changes the prepared output (num_workers and verify do not)."""
    settings = {
        "format_version": FORMAT_VERSION,
        "tokenizer": _tokenizer_setting(cfg),
        "val_fraction": cfg.val_fraction,
        "seed": cfg.seed,
        "text_field": cfg.text_field,
        "txt_per_line": cfg.txt_per_line,
        "shard_tokens": cfg.shard_tokens,
    }
    if not cfg.tokenizer_model:
        settings["tokenizer_sample_lines"] = cfg.tokenizer_sample_lines
    return settings


def _hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def settings_key(settings: dict) -> str:
    return _hash(json.dumps(settings, sort_keys=True))


def data_key(settings: dict, source_digest: str) -> str:
    """The prepared directory's name: settings and source content together."""
    return _hash(f"{settings_key(settings)}|{source_digest}")


def _legacy_key(settings: dict, source_fp: str) -> str:
    """The key of a manifest written before content-addressed directories (FORMAT_VERSION 2, flat `out_dir`)."""
    raw = f"v2|{source_fp}|{settings['tokenizer']}|{settings['val_fraction']}|{settings['seed']}"
    return _hash(raw)


# ---- prepared directories ----------------------------------------------------------------------------------------
@dataclass
class _Prepared:
    dir: Path
    manifest: dict

    @property
    def mtime(self) -> float:
        return (self.dir / MANIFEST).stat().st_mtime

    def problem(self) -> str | None:
        """Why this directory cannot be used (missing or truncated files), or None."""
        try:
            verify_shards(self.dir, self.manifest)
        except DataError as e:
            return str(e)
        tok = self.dir / self.manifest.get("tokenizer", {}).get("file", TOKENIZER)
        return None if tok.is_file() else f"its tokenizer {tok} is missing"


def _with_paths(manifest: dict, data_dir: Path) -> dict:
    """The manifest as callers see it: `dir` and `tokenizer.path` absolute, for where the directory is now."""
    d = data_dir.resolve()
    tok = dict(manifest.get("tokenizer", {}))
    tok["path"] = str(d / tok.get("file", TOKENIZER))
    return {**manifest, "dir": str(d), "tokenizer": tok}


def _candidates(out: Path) -> list[_Prepared]:
    """`out` itself when it holds a manifest, then its non-hidden subdirectories that do."""
    if not out.is_dir():
        return []
    dirs = [out, *sorted(p for p in out.iterdir() if p.is_dir() and not p.name.startswith("."))]
    found = []
    for d in dirs:
        path = d / MANIFEST
        if path.is_file():
            try:
                found.append(_Prepared(d, json.loads(path.read_text())))
            except (json.JSONDecodeError, OSError):
                continue  # unreadable: never a match, and never deleted
    return found


def _read_digest_cache(out: Path) -> dict:
    try:
        return json.loads((out / DIGEST_CACHE).read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def _remember_digest(out: Path, fp: str, digest: str) -> None:
    cache = _read_digest_cache(out)
    if cache.get(fp) == digest:
        return
    cache[fp] = digest
    try:
        atomic_write_text(out / DIGEST_CACHE, json.dumps(dict(list(cache.items())[-256:]), indent=0))
    except OSError:
        pass  # a read-only out_dir: the digest is recomputed next time


def _find(cfg: DataConfig, log, hash_content: bool = True) -> tuple[dict | None, dict]:
    """(manifest of the reusable prepared directory or None, build context). Reads the text only on a fingerprint
    miss (and not at all without `hash_content`: then a miss is None, {}); raises when the source is missing and
    nothing with these settings is prepared."""
    settings = data_settings(cfg)
    sk = settings_key(settings)
    out = Path(cfg.out_dir).expanduser()
    candidates = _candidates(out)
    pinned = _pinned(out, candidates, sk)
    try:
        source = resolve_source(cfg.source, cfg.hf_split, cfg.text_field, cfg.hf_config, cfg.txt_per_line)
    except SourceMissing as e:
        return _without_source(cfg, out, candidates, pinned, sk, e, log), {}
    fp = source.fingerprint()
    legacy = _legacy_key(settings, fp)
    for c in candidates:
        m = c.manifest
        if "settings_key" in m:  # same settings, and the text unchanged by its cheap fingerprint
            same = m["settings_key"] == sk and m.get("source_fingerprint") == fp
        else:  # a manifest from before content-addressed directories
            same = m.get("key") == legacy
        if same:
            if (why := c.problem()) is None:
                log(f"prepare: {c.dir} is up to date (key {m['key']}); reusing it")
                return _with_paths(m, c.dir), {}
            log(f"prepare: not reusing {c.dir}: {why}")
    if pinned is not None:
        log(
            f"prepare: data.out_dir is the prepared directory {pinned.dir} (from {pinned.manifest.get('source')}); "
            f"using it as is although data.source's files changed (or were touched) since it was prepared (set data.out_dir={str(out.parent)!r} to "
            "prepare the current text)"
        )
        return _with_paths(pinned.manifest, pinned.dir), {}
    if not hash_content:
        return None, {}
    digest = _read_digest_cache(out).get(fp) or source.digest()
    key = data_key(settings, digest)
    for c in candidates:
        if "settings_key" in c.manifest and c.manifest.get("key") == key and c.problem() is None:
            _remember_digest(out, fp, digest)
            log(f"prepare: {c.dir} holds this text (key {key}); reusing it")
            return _with_paths(c.manifest, c.dir), {}
    return None, {"source": source, "out": out, "settings": settings, "key": key, "fp": fp, "digest": digest}


def _pinned(out: Path, candidates: list[_Prepared], sk: str) -> _Prepared | None:
    """`out` itself when it is one keyed prepared directory (named by its key) with these settings: data.out_dir
    names that data explicitly (e.g. the directory a checkpoint's tokenizer lives in), so it is used as it is."""
    c = candidates[0] if candidates and candidates[0].dir == out else None
    if c is None or c.manifest.get("settings_key") != sk or c.manifest.get("key") != out.name:
        return None
    return c if c.problem() is None else None


def _without_source(cfg, out: Path, candidates: list, pinned: _Prepared | None, sk: str, err: SourceMissing, log):
    usable = [c for c in candidates if c.manifest.get("settings_key") == sk and c.problem() is None]
    if not usable:
        others = f" ({len(candidates)} prepared there with other data settings)" if candidates else ""
        raise DataError(
            f"{err}. No prepared data with the same data settings exists under data.out_dir={str(out)!r} to use "
            f"instead{others}. Restore the source or point data.source at where it moved; or point data.out_dir at "
            "the directory prepared for this run (with the data.* settings it was prepared with)"
        ) from err
    # data.out_dir's own data when it names one directory, else prefer what was built from this source
    pool = [pinned] if pinned else [c for c in usable if c.manifest.get("source") == err.name] or usable
    pick = max(pool, key=lambda c: c.mtime)
    extra = f", the newest of {len(pool)}" if len(pool) > 1 else ""
    log(
        f"prepare: data.source={cfg.source!r} is missing; using the prepared data in {pick.dir} "
        f"(from {pick.manifest.get('source')}, {pick.manifest.get('created', 'date unknown')}{extra})"
    )
    return _with_paths(pick.manifest, pick.dir)


def find_prepared(cfg: DataConfig, log=print) -> dict:
    """The manifest (with `dir`) of the prepared data for `cfg`, without building any; DataError when there is none."""
    manifest, _ = _find(cfg, log)
    if manifest is None:
        raise DataError(
            f"no prepared data for these data.* settings under data.out_dir={cfg.out_dir!r}: run `mhc-train prepare` "
            "(same data.* settings) first"
        )
    return manifest


def prepare(cfg: DataConfig, log=print) -> dict:
    """Build (or reuse) tokenizer, shards and manifest for `cfg`; returns the manifest, whose `dir` is the absolute
    prepared directory (give it to `TokenData`) and whose `tokenizer` holds the absolute `path` and `sha256`.

    Holds `<out_dir>/.prepare.lock` throughout: another process preparing into the same root is waited for (with a
    progress message), and its result is then found and reused."""
    validate_data(cfg)
    quiet = []
    manifest, _ = _find(cfg, quiet.append, hash_content=False)  # the common case: unchanged input, no lock needed
    if manifest is not None:
        for line in quiet:
            log(line)
        return manifest
    out = Path(cfg.out_dir).expanduser()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"cannot create data.out_dir={cfg.out_dir!r} ({e}); point it at a writable directory") from e
    with _prepare_lock(out, log) as lock:  # another process may be building this very data: wait, then look again
        manifest, ctx = _find(cfg, log)
        if manifest is not None:
            return manifest
        return _build(cfg, log=log, lock=lock, **ctx)


# ---- building ----------------------------------------------------------------------------------------------------
def _prepare_lock(out: Path, log) -> PrepareLock:
    def progress(holder: dict) -> str:
        try:
            p = json.loads((Path(holder["building"]) / PROGRESS).read_text())
        except (KeyError, OSError, ValueError):
            return "" if "building" not in holder else "training the tokenizer"
        done = len(p["splits"]["train"]["shards"])
        return f"{p['documents']:,} documents tokenised, {done} train shard(s) complete"

    return PrepareLock(out / LOCK, log, progress)


def _build(cfg, source: TextSource, out: Path, settings: dict, key: str, fp: str, digest: str, log, lock) -> dict:
    """Build (or continue building) `<out>/.build-<key>` and rename it to `<out>/<key>`, under the prepare lock."""
    final, build = out / key, out / f".build-{key}"
    lock.record(building=str(build))
    build.mkdir(exist_ok=True)
    try:
        manifest = _build_into(cfg, source, build, final, settings, key, fp, digest, log)
    except DataError:  # the input is bad: this build can never be continued
        shutil.rmtree(build, ignore_errors=True)
        raise
    # (a kill or any other error keeps the build directory: the next run continues from its last complete shard)
    (build / PROGRESS).unlink(missing_ok=True)
    fsync_dir(build)
    if final.exists():  # a damaged copy (a usable one would have been found): keep it aside, never delete it
        aside = out / f".damaged-{key}-{time.strftime('%Y%m%dT%H%M%S')}"
        os.rename(final, aside)
        log(f"prepare: moved the damaged {final} to {aside}")
    os.rename(build, final)
    fsync_dir(out)
    _remember_digest(out, fp, digest)
    t, v = manifest["splits"]["train"], manifest["splits"]["val"]
    log(
        f"prepare: wrote {final} (train {t['tokens']:,} tokens in {len(t['shards'])} shard(s), val {v['tokens']:,} "
        f"tokens; {t['documents']:,} + {v['documents']:,} documents)"
    )
    return _with_paths(manifest, final)


def _documents(cfg, source: TextSource, skip: int = 0):
    """(position, split, text) of the source's non-blank documents from position `skip` on."""
    for pos, split, doc in split_documents(source.documents(), cfg.val_fraction, cfg.seed):
        if pos >= skip:
            yield pos, split, doc


def _make_tokenizer(cfg, source: TextSource, build: Path, log) -> Path:
    """The build's tokenizer file: a copy of data.tokenizer_model, or one trained on a seeded sample of train lines."""
    if cfg.tokenizer_model:
        given = Path(cfg.tokenizer_model).expanduser()
        path = build / (TOKENIZER_JSON if is_tokenizer_json(given) else TOKENIZER)
        load_tokenizer(given)  # fails here, naming the file, when it is not a tokenizer
        shutil.copyfile(given, path)
        return path
    log(f"prepare: sampling up to {cfg.tokenizer_sample_lines:,} lines to train a {cfg.vocab_size}-piece BPE tokenizer")
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


def _build_into(cfg, source, build: Path, final: Path, settings, key, fp, digest, log) -> dict:
    t0 = time.perf_counter()
    progress = _read_progress(build, key)
    if progress is not None:
        tok_path = build / progress["tokenizer_file"]
        log(
            f"prepare: continuing the build in {build} after {progress['documents']:,} documents "
            f"({len(progress['splits']['train']['shards'])} complete train shard(s))"
        )
    else:
        for p in build.iterdir():  # a build killed before its first record: start it over
            p.unlink() if p.is_file() else shutil.rmtree(p)
        tok_path = _make_tokenizer(cfg, source, build, log)
    tokenizer_s = time.perf_counter() - t0
    tok = load_tokenizer(tok_path)
    dtype = np.dtype(np.uint16 if tok.vocab_size <= 1 << 16 else np.uint32)
    resume = progress["splits"] if progress else {}
    try:
        writers = {s: ShardWriter(build, s, dtype, cfg.shard_tokens, resume.get(s)) for s in ("train", "val")}
    except DataError as e:  # the files do not match the record (edited by hand?): build from the start
        log(f"prepare: cannot continue the build in {build} ({e}); starting it over")
        (build / PROGRESS).unlink(missing_ok=True)
        return _build_into(cfg, source, build, final, settings, key, fp, digest, log)
    skip = progress["documents"] if progress else 0
    log(
        f"prepare: tokenising {source.name} with {cfg.num_workers} worker(s) into shards of {cfg.shard_tokens:,} tokens"
    )
    t1 = time.perf_counter()
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
    splits = {s: w.finish() for s, w in writers.items()}
    if not splits["train"]["tokens"] or not splits["val"]["tokens"]:
        raise DataError("the input text is empty: every document is blank")
    manifest = {
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
        # how this build went (not part of the data: informational, for benchmarks)
        "build": {
            "num_workers": cfg.num_workers,
            "tokenizer_s": round(tokenizer_s, 3),
            "tokenize_s": round(time.perf_counter() - t1, 3),
            "chars_tokenised": chars,
            "resumed_at_document": skip,
        },  # fmt: skip
    }
    atomic_write_text(build / MANIFEST, json.dumps(manifest, indent=2))
    return manifest


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


# ---- reading -----------------------------------------------------------------------------------------------------
def load_manifest(data_dir: str | Path) -> dict:
    """The manifest of a prepared directory, with absolute `dir` and `tokenizer.path`."""
    path = Path(data_dir) / MANIFEST
    if not path.is_file():
        hint = ""
        if Path(data_dir).is_dir() and any((p / MANIFEST).is_file() for p in Path(data_dir).iterdir() if p.is_dir()):
            hint = " (it is a data.out_dir root: open the `dir` that prepare() returns, one of its subdirectories)"
        raise DataError(f"no {MANIFEST} in {data_dir}{hint}: run `mhc-train prepare` (same data.* settings) first")
    try:
        return _with_paths(json.loads(path.read_text()), Path(data_dir))
    except json.JSONDecodeError as e:
        raise DataError(f"{path} is not valid JSON ({e}); delete {data_dir} and re-run `mhc-train prepare`") from e
