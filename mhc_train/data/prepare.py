"""Text -> sentencepiece tokenizer -> flat binary token shards plus a JSON manifest, in a content-addressed directory.

`data.out_dir` is a root: each prepared output lives in `<out_dir>/<key>/`, where the key hashes the source's content
digest and every data setting that changes the output (tokenizer: the given model's sha256, or vocab_size and
max_sentencepiece_chars; val_fraction; seed; the shard format). A directory holds `tokenizer.model`, `train.bin`,
`val.bin` (uint16 when the vocabulary fits, else uint32; documents joined with EOS) and `manifest.json`. It is built in
a hidden temporary directory beside it and renamed into place when complete, so a killed prepare never leaves a half
directory under a key, and nothing is ever rebuilt in place: editing the source gives a new key and a new directory,
and the tokenizer and shards that existing checkpoints name stay where they are.

- Reuse is cheap: a prepared directory whose manifest has the same settings and the same source fingerprint (paths,
  sizes, mtimes) is returned without reading the text. Otherwise the content is hashed (remembered per fingerprint in
  `<out_dir>/.source_digests.json`), so touched, copied or moved but unchanged text still finds its directory.
- A missing local source (or bundled corpus package) falls back to the newest prepared directory with the same
  settings, with a one-line notice; none gives a DataError naming the source and the fix.
- An `out_dir` that itself holds a `manifest.json` is a candidate like its subdirectories: an older flat output is
  reused while its input is unchanged (new outputs then go into keyed subdirectories of it, the flat files left as
  they are); a keyed directory named directly (`data.out_dir=<root>/<key>`, e.g. where a checkpoint's tokenizer
  lives) with the same settings is used as it is, with a notice when the source changed or is missing.
- Train/val split by whole documents (shuffled with `data.seed`); a single document is cut into line blocks first.
- Tokenisation runs through `datasets.map` (`data.num_proc` workers) on an Arrow cache inside the build directory, so
  the corpus never has to fit in RAM.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import socket
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mhc_train.config import DataConfig
from mhc_train.data.errors import DataError, SourceMissing
from mhc_train.data.sources import TextSource, resolve_source
from mhc_train.data.tokenizer import Tokenizer, file_sha256, train_tokenizer
from mhc_train.rundir import fsync_dir

FORMAT_VERSION = 2  # bump when tokenizer training or shard layout changes: a new key, so a new directory
MANIFEST = "manifest.json"
TOKENIZER = "tokenizer.model"
DIGEST_CACHE = ".source_digests.json"  # source fingerprint -> content digest, so a touched file is hashed once
_TMP = re.compile(r"^\.tmp-[0-9a-f]{16}-(\d+)@(.+)$")


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# ---- keys --------------------------------------------------------------------------------------------------------
def _tokenizer_setting(cfg: DataConfig) -> str:
    """The tokenizer part of the key: the given model's sha256, or what trains one."""
    if cfg.tokenizer_model:
        path = Path(cfg.tokenizer_model).expanduser()
        if not path.is_file():
            raise DataError(
                f"data.tokenizer_model={cfg.tokenizer_model!r} does not exist: give an existing sentencepiece .model, "
                "or leave it empty to train one on the text"
            )
        return file_sha256(path)
    return f"train:{cfg.vocab_size}:{cfg.max_sentencepiece_chars}"


def data_settings(cfg: DataConfig) -> dict:
    """Every data setting besides the source that changes the prepared output (num_proc does not)."""
    return {
        "format_version": FORMAT_VERSION,
        "tokenizer": _tokenizer_setting(cfg),
        "val_fraction": cfg.val_fraction,
        "seed": cfg.seed,
    }


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


def _find(cfg: DataConfig, log) -> tuple[dict | None, dict]:
    """(manifest of the reusable prepared directory or None, build context). Reads the text only on a fingerprint
    miss; raises when the source is missing and nothing with these settings is prepared."""
    settings = data_settings(cfg)
    sk = settings_key(settings)
    out = Path(cfg.out_dir).expanduser()
    candidates = _candidates(out)
    pinned = _pinned(out, candidates, sk)
    try:
        source = resolve_source(cfg.source, cfg.hf_split, cfg.hf_text_field)
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
    prepared directory (give it to `TokenData`) and whose `tokenizer` holds the absolute `path` and `sha256`."""
    manifest, ctx = _find(cfg, log)
    if manifest is not None:
        return manifest
    return _build(cfg, log=log, **ctx)


# ---- building ----------------------------------------------------------------------------------------------------
def _split_documents(docs: list[str], val_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise DataError("the input text is empty: every document is blank")
    if len(docs) < 2:  # one big file: cut it into blocks of 200 lines so there is something to hold out
        lines = docs[0].splitlines(keepends=True)
        docs = ["".join(lines[i : i + 200]) for i in range(0, len(lines), 200)]
        if len(docs) < 2:
            raise DataError("the input is a single document under 200 lines: too little text to hold out a val split")
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    n_val = max(1, round(val_fraction * len(docs)))
    val_idx = set(order[:n_val])
    return [d for i, d in enumerate(docs) if i not in val_idx], [d for i, d in enumerate(docs) if i in val_idx]


def _write_shard(ds, path: Path, dtype) -> tuple[int, str]:
    """Stream the `ids` column of a tokenised dataset into a flat binary file; returns (tokens, sha256)."""
    h, count = hashlib.sha256(), 0
    with open(path, "wb") as f:
        for batch in ds.iter(batch_size=256):
            for ids in batch["ids"]:
                arr = np.asarray(ids, dtype=dtype)
                f.write(arr.tobytes())
                h.update(arr.tobytes())
                count += arr.size
        f.flush()
        os.fsync(f.fileno())
    return count, h.hexdigest()


def _remove_stale_builds(out: Path) -> None:
    """Temporary build directories of killed prepare runs on this host (their process is gone)."""
    host = socket.gethostname()
    for p in out.iterdir():
        m = _TMP.match(p.name)
        if m and m[2] == host:
            try:
                os.kill(int(m[1]), 0)
            except ProcessLookupError:
                shutil.rmtree(p, ignore_errors=True)
            except PermissionError:
                pass  # alive, another user's


def _build(cfg, source: TextSource, out: Path, settings: dict, key: str, fp: str, digest: str, log) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    _remove_stale_builds(out)
    final = out / key
    tmp = out / f".tmp-{key}-{os.getpid()}@{socket.gethostname()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        manifest = _build_into(cfg, source, tmp, final, settings, key, fp, digest, log)
        fsync_dir(tmp)
        try:
            os.rename(tmp, final)
        except OSError:  # `final` exists: another process finished first, or a damaged copy
            existing = next((c for c in _candidates(final)[:1] if c.dir == final), None)
            if existing is not None and existing.problem() is None:
                shutil.rmtree(tmp, ignore_errors=True)
                log(f"prepare: {final} was completed by another process; reusing it")
                return _with_paths(existing.manifest, final)
            aside = out / f".damaged-{key}-{time.strftime('%Y%m%dT%H%M%S')}"
            os.rename(final, aside)
            os.rename(tmp, final)
            log(f"prepare: moved the damaged {final} to {aside}")
        fsync_dir(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(
        f"prepare: wrote {final} (train {manifest['splits']['train']['tokens']:,} tokens, val "
        f"{manifest['splits']['val']['tokens']:,} tokens)"
    )
    return _with_paths(manifest, final)


def _build_into(cfg, source, tmp: Path, final: Path, settings, key, fp, digest, log) -> dict:
    import datasets

    log(f"prepare: reading {source.name}")
    train_docs, val_docs = _split_documents(list(source.documents()), cfg.val_fraction, cfg.seed)
    tok_path = tmp / TOKENIZER
    if cfg.tokenizer_model:
        shutil.copyfile(Path(cfg.tokenizer_model).expanduser(), tok_path)
    else:
        log(f"prepare: training a {cfg.vocab_size}-piece BPE tokenizer")
        lines = (line for d in train_docs for line in d.splitlines())
        tok_path = train_tokenizer(lines, tmp / "tokenizer", cfg.vocab_size, cfg.max_sentencepiece_chars, cfg.seed)
    tok = Tokenizer(tok_path)
    dtype = np.uint16 if tok.vocab_size <= 1 << 16 else np.uint32

    def encode(batch):
        return {"ids": [ids + [tok.eos_id] for ids in tok.encode(batch["text"])]}

    splits = {}
    cache = tmp / "arrow_cache"
    for split, docs in (("train", train_docs), ("val", val_docs)):
        ds = datasets.Dataset.from_dict({"text": docs})
        ds = ds.map(
            encode,
            batched=True,
            batch_size=16,
            num_proc=cfg.num_proc if cfg.num_proc > 1 else None,
            remove_columns=["text"],
            cache_file_name=str(cache / f"{split}.arrow"),
            desc=f"tokenize {split}",
        )
        cache.mkdir(parents=True, exist_ok=True)
        tokens, sha = _write_shard(ds, tmp / f"{split}.bin", dtype)
        splits[split] = {"file": f"{split}.bin", "tokens": tokens, "sha256": sha, "documents": len(docs)}
        del ds
    shutil.rmtree(cache, ignore_errors=True)
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
            "file": TOKENIZER,
            "path": str((final / TOKENIZER).resolve()),  # informational: readers take dir / file
            "sha256": file_sha256(tok_path),
            "vocab_size": tok.vocab_size,
            "eos_id": tok.eos_id,
        },
        "vocab_size": tok.vocab_size,
        "dtype": np.dtype(dtype).name,
        "splits": splits,
    }
    atomic_write_text(tmp / MANIFEST, json.dumps(manifest, indent=2))
    return manifest


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


def verify_shards(data_dir: str | Path, manifest: dict) -> None:
    """Each shard exists and holds exactly the manifest's token count (a cheap size check, no hashing)."""
    itemsize = np.dtype(manifest["dtype"]).itemsize
    for split, info in manifest["splits"].items():
        path = Path(data_dir) / info["file"]
        if not path.is_file():
            raise DataError(f"{split} shard {path} is missing; re-run `mhc-train prepare`")
        expected = info["tokens"] * itemsize
        actual = path.stat().st_size
        if actual != expected:
            raise DataError(
                f"{split} shard {path} has {actual} bytes but the manifest says {info['tokens']} tokens "
                f"({expected} bytes): it is truncated or from another prepare run; re-run `mhc-train prepare` "
                "(same data.* settings) to build a fresh copy"
            )
