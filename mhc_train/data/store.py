"""Prepared data on disk: content-addressed directories under `data.out_dir`, their keys and manifests, and finding
one to reuse (build.py makes them).

`data.out_dir` is a root: each prepared output lives in `<out_dir>/<key>/`, where the key hashes the source's content
digest and every data setting that changes the output (tokenizer: the given file's sha256, or vocab_size,
max_sentencepiece_chars and tokenizer_sample_lines; val_fraction; seed; text_field; txt_per_line; shard_tokens; the
shard format). A directory holds the tokenizer (`tokenizer.model`, or `tokenizer.json` when one was given), the shards
`train_00000.bin`, ... and `val_00000.bin`, ... (uint16 when the vocabulary fits, else uint32; documents joined with
EOS; see shards.py) and `manifest.json` (per-shard token counts and sha256). Nothing is ever rebuilt in place:
editing the source gives a new key and a new directory, and the tokenizer and shards that checkpoints name stay.

- Reuse is cheap: a prepared directory whose manifest has the same settings and the same source fingerprint (paths,
  sizes, mtimes) is returned without reading the text. Otherwise the content is hashed (remembered per fingerprint in
  `<out_dir>/.source_digests.json`), so touched, copied or moved but unchanged text still finds its directory.
- A missing local source (or bundled corpus package) falls back to the newest prepared directory with the same
  settings, with a one-line notice; none gives a DataError naming the source and the fix.
- An `out_dir` that itself holds a `manifest.json` is a candidate like its subdirectories: an older flat output is
  reused while its input is unchanged (new outputs then go into keyed subdirectories of it, the flat files left as
  they are); a keyed directory named directly (`data.out_dir=<root>/<key>`, e.g. where a checkpoint's tokenizer
  lives) with the same settings is used as it is, with a notice when the source changed or is missing.
- Notices are progress records of kind "data.prepare" (`mhc_train.io.log.progress`): stage "reusing" for a directory
  found, "rebuilding" for one found but unusable. `find` collects them, so `prepare` can drop the ones of a first,
  lock-free look that found nothing.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from mhc_train.config import DataConfig
from mhc_train.data.errors import DataError, SourceMissing
from mhc_train.data.shards import verify_shards
from mhc_train.data.sources import resolve_source
from mhc_train.data.tokenizer import file_sha256
from mhc_train.io.files import atomic_write_text
from mhc_train.io.log import get_logger, progress

logger = get_logger(__name__)
KIND = "data.prepare"  # the progress kind of data preparation; field `stage` (see mhc_train.data)

FORMAT_VERSION = 3  # bump when tokenizer training or shard layout changes: a new key, so a new directory
MANIFEST = "manifest.json"
TOKENIZER = "tokenizer.model"
TOKENIZER_JSON = "tokenizer.json"
PROGRESS = "progress.json"  # a build's resume point
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


def with_paths(manifest: dict, data_dir: Path) -> dict:
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


def remember_digest(out: Path, fp: str, digest: str) -> None:
    cache = _read_digest_cache(out)
    if cache.get(fp) == digest:
        return
    cache[fp] = digest
    try:
        atomic_write_text(out / DIGEST_CACHE, json.dumps(dict(list(cache.items())[-256:]), indent=0))
    except OSError:
        pass  # a read-only out_dir: the digest is recomputed next time


def content_digest(out: Path, source) -> str:
    """The digest of a source's text (`TextSource.digest`), read from `<out>/.source_digests.json` by the source's
    fingerprint where known, else hashed once and remembered there (the prepare that follows then reads no text)."""
    fp = source.fingerprint()
    digest = _read_digest_cache(out).get(fp) or source.digest()
    remember_digest(out, fp, digest)
    return digest


def find(cfg: DataConfig, notes: list, hash_content: bool = True) -> tuple[dict | None, dict]:
    """(manifest of the reusable prepared directory or None, build context); appends its notices to `notes` as
    (stage, message) for `emit`. Reads the text only on a fingerprint miss (and not at all without `hash_content`:
    then a miss is None, {}); raises when the source is missing and nothing with these settings is prepared."""
    settings = data_settings(cfg)
    sk = settings_key(settings)
    out = Path(cfg.out_dir).expanduser()
    candidates = _candidates(out)
    pinned = _pinned(out, candidates, sk)
    try:
        source = resolve_source(cfg.source, cfg.hf_split, cfg.text_field, cfg.hf_config, cfg.txt_per_line)
    except SourceMissing as e:
        return _without_source(cfg, out, candidates, pinned, sk, e, notes), {}
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
                notes.append(("reusing", f"prepare: {c.dir} is up to date (key {m['key']}); reusing it"))
                return with_paths(m, c.dir), {}
            notes.append(("rebuilding", f"prepare: not reusing {c.dir}: {why}"))
    if pinned is not None:
        notes.append(
            (
                "reusing",
                f"prepare: data.out_dir is the prepared directory {pinned.dir} (from {pinned.manifest.get('source')}); "
                f"using it as is although data.source's files changed (or were touched) since it was prepared (set data.out_dir={str(out.parent)!r} to "
                "prepare the current text)",
            )
        )
        return with_paths(pinned.manifest, pinned.dir), {}
    if not hash_content:
        return None, {}
    digest = _read_digest_cache(out).get(fp) or source.digest()
    key = data_key(settings, digest)
    for c in candidates:
        if "settings_key" in c.manifest and c.manifest.get("key") == key and c.problem() is None:
            remember_digest(out, fp, digest)
            notes.append(("reusing", f"prepare: {c.dir} holds this text (key {key}); reusing it"))
            return with_paths(c.manifest, c.dir), {}
    return None, {"source": source, "out": out, "settings": settings, "key": key, "fp": fp, "digest": digest}


def _pinned(out: Path, candidates: list[_Prepared], sk: str) -> _Prepared | None:
    """`out` itself when it is one keyed prepared directory (named by its key) with these settings: data.out_dir
    names that data explicitly (e.g. the directory a checkpoint's tokenizer lives in), so it is used as it is."""
    c = candidates[0] if candidates and candidates[0].dir == out else None
    if c is None or c.manifest.get("settings_key") != sk or c.manifest.get("key") != out.name:
        return None
    return c if c.problem() is None else None


def _without_source(cfg, out: Path, candidates: list, pinned: _Prepared | None, sk: str, err: SourceMissing, notes):
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
    notes.append(
        (
            "reusing",
            f"prepare: data.source={cfg.source!r} is missing; using the prepared data in {pick.dir} "
            f"(from {pick.manifest.get('source')}, {pick.manifest.get('created', 'date unknown')}{extra})",
        )
    )
    return with_paths(pick.manifest, pick.dir)


def emit(notes: list) -> None:
    """Log (stage, message) notices as "data.prepare" progress records (rank 0 only: reuse is not progress)."""
    for stage, message in notes:
        progress(logger, KIND, message, stage=stage)


def find_prepared(cfg: DataConfig) -> dict:
    """The manifest (with `dir`) of the prepared data for `cfg`, without building any; DataError when there is none."""
    notes: list = []
    manifest, _ = find(cfg, notes)
    emit(notes)
    if manifest is None:
        raise DataError(
            f"no prepared data for these data.* settings under data.out_dir={cfg.out_dir!r}: run `mhc-train prepare` "
            "(same data.* settings) first"
        )
    return manifest


def load_manifest(data_dir: str | Path) -> dict:
    """The manifest of a prepared directory, with absolute `dir` and `tokenizer.path`."""
    path = Path(data_dir) / MANIFEST
    if not path.is_file():
        hint = ""
        if Path(data_dir).is_dir() and any((p / MANIFEST).is_file() for p in Path(data_dir).iterdir() if p.is_dir()):
            hint = " (it is a data.out_dir root: open the `dir` that prepare() returns, one of its subdirectories)"
        raise DataError(f"no {MANIFEST} in {data_dir}{hint}: run `mhc-train prepare` (same data.* settings) first")
    try:
        return with_paths(json.loads(path.read_text()), Path(data_dir))
    except json.JSONDecodeError as e:
        raise DataError(f"{path} is not valid JSON ({e}); delete {data_dir} and re-run `mhc-train prepare`") from e
