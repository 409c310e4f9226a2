"""Text -> sentencepiece tokenizer -> flat binary token shards plus a JSON manifest.

Output (in `data.out_dir`): `tokenizer.model`, `train.bin`, `val.bin` (uint16 when the vocabulary fits, else uint32;
documents joined with EOS) and `manifest.json`, written last and atomically: its presence marks a complete output.

- Train/val split by whole documents (shuffled with `data.seed`); a single document is cut into line blocks first.
- Tokenisation runs through `datasets.map` (`data.num_proc` workers) on an Arrow cache inside `out_dir`, so the
  corpus never has to fit in RAM.
- Re-running with the same input, vocabulary, split and tokenizer returns the existing manifest untouched.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from pathlib import Path

import numpy as np

from mhc_train.config import DataConfig
from mhc_train.data.errors import DataError
from mhc_train.data.sources import resolve_source
from mhc_train.data.tokenizer import Tokenizer, file_sha256, train_tokenizer

FORMAT_VERSION = 2  # bump when tokenizer training or shard layout changes: forces a rebuild
MANIFEST = "manifest.json"


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _prepare_key(cfg: DataConfig, source_fp: str) -> str:
    tok = (
        file_sha256(cfg.tokenizer_model)
        if cfg.tokenizer_model
        else f"train:{cfg.vocab_size}:{cfg.max_sentencepiece_chars}"
    )
    raw = f"v{FORMAT_VERSION}|{source_fp}|{tok}|{cfg.val_fraction}|{cfg.seed}"
    return hashlib.sha256(raw.encode()).hexdigest()[:16]


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
    tmp, h, count = path.with_name(f".{path.name}.tmp"), hashlib.sha256(), 0
    with open(tmp, "wb") as f:
        for batch in ds.iter(batch_size=256):
            for ids in batch["ids"]:
                arr = np.asarray(ids, dtype=dtype)
                f.write(arr.tobytes())
                h.update(arr.tobytes())
                count += arr.size
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return count, h.hexdigest()


def prepare(cfg: DataConfig, log=print) -> dict:
    """Build (or reuse) tokenizer, shards and manifest for `cfg`; returns the manifest."""
    import datasets

    source = resolve_source(cfg.source, cfg.hf_split, cfg.hf_text_field)
    out = Path(cfg.out_dir)
    key = _prepare_key(cfg, source.fingerprint())
    manifest_path = out / MANIFEST
    if manifest_path.is_file():
        old = json.loads(manifest_path.read_text())
        if old.get("key") == key:
            try:
                verify_shards(out, old)
                log(f"prepare: {out} is up to date (key {key}); reusing it")
                return old
            except DataError as e:
                log(f"prepare: rebuilding {out}: {e}")
    out.mkdir(parents=True, exist_ok=True)
    log(f"prepare: reading {source.name}")
    train_docs, val_docs = _split_documents(list(source.documents()), cfg.val_fraction, cfg.seed)

    if cfg.tokenizer_model:
        tok_path = out / "tokenizer.model"
        if Path(cfg.tokenizer_model).resolve() != tok_path.resolve():
            shutil.copyfile(cfg.tokenizer_model, tok_path)
    else:
        log(f"prepare: training a {cfg.vocab_size}-piece BPE tokenizer")
        lines = (line for d in train_docs for line in d.splitlines())
        tok_path = train_tokenizer(lines, out / "tokenizer", cfg.vocab_size, cfg.max_sentencepiece_chars, cfg.seed)
    tok = Tokenizer(tok_path)
    dtype = np.uint16 if tok.vocab_size <= 1 << 16 else np.uint32

    def encode(batch):
        return {"ids": [ids + [tok.eos_id] for ids in tok.encode(batch["text"])]}

    splits = {}
    cache = out / "arrow_cache"
    for split, docs in (("train", train_docs), ("val", val_docs)):
        ds = datasets.Dataset.from_dict({"text": docs})
        ds = ds.map(
            encode,
            batched=True,
            batch_size=16,
            num_proc=cfg.num_proc if cfg.num_proc > 1 else None,
            remove_columns=["text"],
            cache_file_name=str(cache / f"{split}-{key}.arrow"),
            desc=f"tokenize {split}",
        )
        cache.mkdir(parents=True, exist_ok=True)
        tokens, sha = _write_shard(ds, out / f"{split}.bin", dtype)
        splits[split] = {"file": f"{split}.bin", "tokens": tokens, "sha256": sha, "documents": len(docs)}
    shutil.rmtree(cache, ignore_errors=True)
    manifest = {
        "format_version": FORMAT_VERSION,
        "key": key,
        "source": source.name,
        "source_fingerprint": source.fingerprint(),
        "tokenizer": {
            "path": str(tok_path.resolve()),
            "sha256": file_sha256(tok_path),
            "vocab_size": tok.vocab_size,
            "eos_id": tok.eos_id,
        },
        "vocab_size": tok.vocab_size,
        "dtype": np.dtype(dtype).name,
        "splits": splits,
    }
    atomic_write_text(manifest_path, json.dumps(manifest, indent=2))
    log(f"prepare: wrote {out} (train {splits['train']['tokens']:,} tokens, val {splits['val']['tokens']:,} tokens)")
    return manifest


def load_manifest(data_dir: str | Path) -> dict:
    path = Path(data_dir) / MANIFEST
    if not path.is_file():
        raise DataError(f"no {MANIFEST} in {data_dir}: run `mhc-train prepare` (same data.* settings) first")
    try:
        return json.loads(path.read_text())
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
                f"({expected} bytes): it is truncated or from another prepare run; delete {data_dir} and re-run "
                "`mhc-train prepare`"
            )
