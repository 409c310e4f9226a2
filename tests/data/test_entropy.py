"""The val split's unigram entropy: computed once by prepare and stored in the manifest, read from there at launch
(no rank reads the val split for it); a manifest written before it was stored still gets the same number."""

import json
import math

import numpy as np

from mhc_train.data import TokenData
from mhc_train.data.loader import ShardedSplit
from mhc_train.data.stats import unigram_entropy


def test_unigram_entropy_of_a_known_distribution():
    assert unigram_entropy([np.array([0, 0, 1]), np.array([1])], vocab_size=4) == math.log(2)
    assert unigram_entropy([np.array([3, 3, 3])], vocab_size=4) == 0.0


def test_prepare_stores_it_and_the_launch_reads_it_without_the_split(prepared_data, monkeypatch):
    stored = json.loads((prepared_data / "manifest.json").read_text())["splits"]["val"]["unigram_entropy"]
    assert 0 < stored < math.log(512)
    data = TokenData(prepared_data)

    def read_everything(self):
        raise AssertionError("the val split was read for its unigram entropy")

    monkeypatch.setattr(ShardedSplit, "all_tokens", read_everything)
    assert data.unigram_entropy("val") == stored


def test_an_older_manifest_without_it_gives_the_same_number(prepared_data):
    data = TokenData(prepared_data)
    stored = data.manifest["splits"]["val"].pop("unigram_entropy")  # as a manifest from before it was stored
    assert data.unigram_entropy("val") == stored  # bit for bit: the same function over the same shards
