"""Datasets of the bundled offline tasks, read from the files next to this one (lm-eval's `custom_dataset` hook, so
the task YAMLs need no absolute path)."""

from __future__ import annotations

import json
from pathlib import Path

import datasets

HERE = Path(__file__).parent


def local_mc(**kwargs) -> datasets.DatasetDict:
    rows = json.loads((HERE / "local_mc.json").read_text())
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def local_ppl(**kwargs) -> datasets.DatasetDict:
    docs = [d.strip() for d in (HERE / "local_ppl.txt").read_text().split("\n\n") if d.strip()]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list([{"text": d} for d in docs])})
