"""Content-addressed prepared directories: a new directory per input, reuse, atomic builds, a missing source, bad
input, and sentencepiece's vocabulary errors."""

import hashlib
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from mhc_train.config import DataConfig, load_config
from mhc_train.data import DataError, TokenData, find_prepared, prepare
from mhc_train.data import build as prep  # the module that builds (its `_build` is patched)
from mhc_train.data.sources import TextSource
from mhc_train.data.tokenizer import file_sha256
from tests.support.logs import collect_progress

WORDS = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta"]


def _corpus(root: Path, n_docs: int = 4, seed: int = 0) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n_docs):
        (root / f"doc{i}.txt").write_text("\n".join(" ".join(rng.choice(WORDS, 12)) for _ in range(300)))
    return root


def _cfg(src, out, **kw) -> DataConfig:
    return DataConfig(source=str(src), out_dir=str(out), **{"vocab_size": 300, **kw})


def _snapshot(d: Path) -> dict:
    return {
        p.name: (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest()) for p in d.iterdir() if p.is_file()
    }


def _prepared_dirs(out: Path) -> set[str]:
    return {p.name for p in out.iterdir() if p.is_dir() and not p.name.startswith(".")}


def _logged(cfg) -> tuple[dict, list[str]]:
    """prepare(cfg) and the messages of the progress records it logged."""
    with collect_progress() as c:
        manifest = prepare(cfg)
    return manifest, c.messages


def _no_build(*a, **k):
    raise AssertionError("prepare rebuilt data it should have reused")


def test_editing_the_source_makes_a_new_directory_and_keeps_the_old(tmp_path, monkeypatch):
    src, out = _corpus(tmp_path / "src"), tmp_path / "out"
    m1 = prepare(_cfg(src, out))
    d1 = Path(m1["dir"])
    assert d1.is_absolute() and d1.parent == out.resolve() and d1.name == m1["key"]
    assert m1["tokenizer"]["path"] == str(d1 / "tokenizer.model")
    assert m1["tokenizer"]["sha256"] == file_sha256(d1 / "tokenizer.model")
    assert TokenData(m1["dir"]).vocab_size == 300
    before = _snapshot(d1)

    original = (src / "doc0.txt").read_text()
    (src / "doc0.txt").write_text(original + "\nomega omega omega")
    m2 = prepare(_cfg(src, out))
    assert m2["dir"] != m1["dir"] and m2["source_digest"] != m1["source_digest"]
    assert _snapshot(d1) == before  # what a run points at is never touched
    assert _prepared_dirs(out) == {m1["key"], m2["key"]}
    # data.out_dir naming the first keyed directory (where a checkpoint's tokenizer lives) uses it as it is
    m, log = _logged(_cfg(src, d1))
    assert m["dir"] == m1["dir"]
    assert len(log) == 1 and "using it as is" in log[0] and str(out.resolve()) in log[0]
    assert prepare(_cfg(tmp_path / "gone", d1))["dir"] == m1["dir"]
    assert _snapshot(d1) == before and _prepared_dirs(d1) == set()

    # the edit undone (new mtime, same content): the first directory is found by its content, nothing is built
    monkeypatch.setattr(prep, "_build", _no_build)
    (src / "doc0.txt").write_text(original)
    m, log = _logged(_cfg(src, out))
    assert m["dir"] == m1["dir"]
    assert "holds this text" in log[-1]
    # ... and the content hash is remembered: the next check reads no text
    monkeypatch.setattr(TextSource, "digest", lambda self: pytest.fail("hashed the text again"))
    assert prepare(_cfg(src, out))["dir"] == m1["dir"]
    assert _snapshot(d1) == before
    monkeypatch.undo()

    # every setting that changes the output changes the key
    keys = {m1["key"], m2["key"]}
    for kw in ({"seed": 7}, {"val_fraction": 0.3}, {"vocab_size": 320}, {"max_sentencepiece_chars": 50_000}):
        keys.add(prepare(_cfg(src, out, **kw))["key"])
    assert len(keys) == 6
    tok = tmp_path / "given.model"
    shutil.copyfile(d1 / "tokenizer.model", tok)
    m = prepare(_cfg(src, out, tokenizer_model=str(tok)))
    assert m["key"] not in keys and m["tokenizer"]["sha256"] == file_sha256(tok)


def test_the_fixture_directory_serves_test_runs_without_a_rebuild(prepared_data, monkeypatch):
    monkeypatch.setattr(prep, "_build", _no_build)
    # what a training run with the test configs resolves (data.vocab_size follows model.vocab_size=512)
    data_cfg = load_config(["model=test", "train=test", f"data.out_dir={prepared_data}"]).data
    m = prepare(data_cfg)
    assert m["dir"] == str(prepared_data.resolve()) and m["vocab_size"] == 512
    assert m["tokenizer"]["path"] == str(prepared_data.resolve() / "tokenizer.model")
    # the root the fixture prepared into finds the same directory
    root = DataConfig(out_dir=str(prepared_data.parent), vocab_size=512)
    assert prepare(root)["dir"] == m["dir"]
    assert TokenData.for_config(data_cfg).dir == Path(m["dir"])


def test_an_older_flat_output_is_reused_and_never_overwritten(tmp_path):
    src, flat = _corpus(tmp_path / "src"), tmp_path / "flat"
    new = prepare(_cfg(src, tmp_path / "out"))
    # the layout before keyed directories: the files straight in out_dir, the old key, no settings
    shutil.copytree(new["dir"], flat)
    fp = new["source_fingerprint"]
    keep = ("format_version", "source", "source_fingerprint", "vocab_size", "dtype", "splits")
    legacy = {k: new[k] for k in keep}
    legacy["key"] = hashlib.sha256(f"v2|{fp}|train:300:20000000|0.05|1234".encode()).hexdigest()[:16]
    legacy["tokenizer"] = {k: new["tokenizer"][k] for k in ("sha256", "vocab_size", "eos_id")}
    legacy["tokenizer"]["path"] = str(flat / "tokenizer.model")
    (flat / "manifest.json").write_text(json.dumps(legacy))
    before = _snapshot(flat)

    m = prepare(_cfg(src, flat))
    assert m["dir"] == str(flat.resolve()) and m["tokenizer"]["path"] == str(flat.resolve() / "tokenizer.model")
    # other settings: a new keyed directory inside it, the flat output left as it was
    m2 = prepare(_cfg(src, flat, seed=5))
    assert Path(m2["dir"]).parent == flat.resolve()
    assert {k: v for k, v in _snapshot(flat).items() if k in before} == before


def test_a_missing_source_falls_back_to_the_prepared_data(tmp_path):
    src, out = _corpus(tmp_path / "src"), tmp_path / "out"
    first = prepare(_cfg(src, out))
    (src / "doc1.txt").write_text("omega psi chi\n" * 300)
    newest = prepare(_cfg(src, out))
    other = prepare(_cfg(_corpus(tmp_path / "other", seed=1), out))  # another source, newer
    assert len({first["dir"], newest["dir"], other["dir"]}) == 3

    moved = tmp_path / "moved"
    src.rename(moved)
    m, log = _logged(_cfg(src, out))
    assert m["dir"] == newest["dir"]  # the newest prepared from this source
    assert len(log) == 1 and "is missing" in log[0] and newest["dir"] in log[0] and "newest of 2" in log[0]
    assert find_prepared(_cfg(src, out))["dir"] == newest["dir"]
    # the moved text is found by its content
    assert prepare(_cfg(moved, out))["dir"] == newest["dir"]

    with pytest.raises(DataError, match=r"no such file or directory.*No prepared data.*3 prepared there.*Restore"):
        prepare(_cfg(src, out, seed=99))
    with pytest.raises(DataError, match=re.escape(f"data.source='{src}': no such file or directory")):
        prepare(_cfg(src, tmp_path / "empty"))


def test_binary_and_non_utf8_input_fail_naming_the_file(tmp_path):
    out = tmp_path / "out"
    if Path("/bin/ls").is_file():
        with pytest.raises(DataError, match="/bin/ls is not"):
            prepare(_cfg("/bin/ls", out))
    src = _corpus(tmp_path / "src")
    bad = src / "image.txt"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)))
    with pytest.raises(DataError, match=re.escape(f"{bad} is not a text file")):
        prepare(_cfg(src, out))
    bad.write_bytes("caf\xe9 na\xefve\n".encode("latin-1") * 50)
    with pytest.raises(DataError, match=re.escape(f"{bad} is not UTF-8 text (invalid byte 0xe9 at offset 3)")):
        prepare(_cfg(src, out))
    assert not out.exists() or _prepared_dirs(out) == set()


def test_vocabulary_errors_say_which_way_to_change_it(tmp_path):
    src, out = _corpus(tmp_path / "src", n_docs=2), tmp_path / "out"
    with pytest.raises(DataError, match=r"vocab_size=5000 is too large .* at most \d+ pieces .* data.vocab_size<="):
        prepare(_cfg(src, out, vocab_size=5000))
    # 16 distinct characters + 256 byte pieces + <unk> + EOS
    with pytest.raises(DataError, match=r"vocab_size=260 is too small .* at least 274 pieces.* data.vocab_size>=274"):
        prepare(_cfg(src, out, vocab_size=260))
    assert _prepared_dirs(out) == set()
