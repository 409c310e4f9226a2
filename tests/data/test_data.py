"""Tokenizer, prepare (shards + manifest), the loader, and their errors."""

import json
import os

import numpy as np
import pytest

from mhc_train.config import DataConfig
from mhc_train.data import DataError, TokenData, prepare
from mhc_train.data.tokenizer import Tokenizer


def test_tokenizer_round_trip(prepared_data):
    tok = Tokenizer(prepared_data / "tokenizer.model")
    assert tok.vocab_size == 512
    for text in ["To be, or not to be: that is the question.", "  odd   spacing\n\nand é ünïcode ☃ 123"]:
        assert tok.decode(tok.encode(text)) == text


def test_manifest_describes_shards(prepared_data):
    m = json.loads((prepared_data / "manifest.json").read_text())
    assert m["vocab_size"] == 512 and m["dtype"] == "uint16" and m["source"] == "shakespeare"
    for split in ("train", "val"):
        info = m["splits"][split]
        assert info["tokens"] == sum(s["tokens"] for s in info["shards"])
        for i, shard in enumerate(info["shards"]):
            assert shard["file"] == f"{split}_{i:05d}.bin"
            assert (prepared_data / shard["file"]).stat().st_size == shard["tokens"] * 2
    assert m["splits"]["train"]["tokens"] > 10 * m["splits"]["val"]["tokens"] > 0
    data = TokenData(prepared_data)
    assert max(int(a.max()) for a in data.splits["train"].all_tokens()) < 512


def test_prepare_reuses_unchanged_output(prepared_data, tmp_path):
    before = {p.name: p.stat().st_mtime_ns for p in prepared_data.iterdir()}
    prepare(DataConfig(out_dir=str(prepared_data), vocab_size=512))
    assert {p.name: p.stat().st_mtime_ns for p in prepared_data.iterdir()} == before


def test_prepare_local_directory_and_errors(tmp_path):
    src = tmp_path / "corpus"
    src.mkdir()
    with pytest.raises(DataError, match=r"holds no \.txt, \.jsonl, .* files"):
        prepare(DataConfig(source=str(src), out_dir=str(tmp_path / "o")))
    (src / "a.txt").write_text("")
    with pytest.raises(DataError, match="every input file is empty"):
        prepare(DataConfig(source=str(src), out_dir=str(tmp_path / "o")))
    with pytest.raises(DataError, match="no such file or directory"):
        prepare(DataConfig(source=str(tmp_path / "missing"), out_dir=str(tmp_path / "o")))
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta"]
    for i in range(4):
        (src / f"doc{i}.txt").write_text("\n".join(" ".join(rng.choice(words, 12)) for _ in range(300)))
    m = prepare(DataConfig(source=str(src), out_dir=str(tmp_path / "o"), vocab_size=300))
    assert m["vocab_size"] == 300 and m["splits"]["val"]["documents"] == 1


def test_hub_dataset_offline_fails_with_the_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataError, match="hub datasets need a network"):
        prepare(DataConfig(source="hf:nonexistent/dataset", out_dir=str(tmp_path / "o")))


def test_truncated_shard_and_missing_manifest_are_reported(prepared_data, tmp_path):
    copy = tmp_path / "copy"
    copy.mkdir()
    for f in prepared_data.iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    with open(copy / "val_00000.bin", "r+b") as f:
        f.truncate(os.path.getsize(copy / "val_00000.bin") - 10)
    with pytest.raises(DataError, match=f"val shard {copy / 'val_00000.bin'} has .* truncated or from another"):
        TokenData(copy)
    (copy / "manifest.json").unlink()
    with pytest.raises(DataError, match="run `mhc-train prepare`"):
        TokenData(copy)


def test_vocab_and_seq_len_mismatch_are_reported(prepared_data):
    data = TokenData(prepared_data)
    with pytest.raises(DataError, match=r"model.vocab_size=1000 but the tokenizer .* has 512 pieces"):
        data.check_compatible(1000, 32)
    with pytest.raises(DataError, match="train.seq_len=100000000 needs at least"):
        data.check_compatible(512, 100_000_000)


def test_loader_is_deterministic_in_seed_and_step(prepared_data):
    a, b = TokenData(prepared_data), TokenData(prepared_data)
    x1, y1 = a.train_batch(seed=3, step=17, micro=0, batch_size=4, seq_len=16)
    x2, y2 = b.train_batch(seed=3, step=17, micro=0, batch_size=4, seq_len=16)
    assert (x1 == x2).all() and (y1 == y2).all()
    assert (x1[:, 1:] == y1[:, :-1]).all()  # targets are inputs shifted by one
    x3, _ = a.train_batch(seed=3, step=18, micro=0, batch_size=4, seq_len=16)
    x4, _ = a.train_batch(seed=4, step=17, micro=0, batch_size=4, seq_len=16)
    assert not (x1 == x3).all() and not (x1 == x4).all()
    v1, v2 = a.val_batches(2, 4, 16), b.val_batches(2, 4, 16)
    assert all((p[0] == q[0]).all() for p, q in zip(v1, v2))
