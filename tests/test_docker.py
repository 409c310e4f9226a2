"""docker/Dockerfile without a Docker engine: every `COPY` source exists in the repository, everything the package
build needs is copied (each folder pyproject's package-dir names, pyproject itself and its readme), and the base
image's torch meets pyproject's `torch>=` floor, so pip keeps the image's CUDA build instead of replacing it."""

from __future__ import annotations

import json
import re
import shlex

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

from tests.support.launch import REPO

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

DOCKERFILE = REPO / "docker" / "Dockerfile"


def _instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) per instruction, continuation lines joined and comments dropped."""
    out, pending = [], ""
    for line in text.splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        pending += line.rstrip()
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        word, _, rest = pending.strip().partition(" ")
        out.append((word.upper(), rest.strip()))
        pending = ""
    return out


def _copies(instructions) -> list[tuple[list[str], str]]:
    """(sources, destination) of each COPY from the build context (a `--from=` stage copy is not one)."""
    copies = []
    for word, rest in instructions:
        if word != "COPY":
            continue
        args = json.loads(rest) if rest.startswith("[") else shlex.split(rest)
        flags = [a for a in args if a.startswith("--")]
        if any(f.startswith("--from") for f in flags):
            continue
        paths = [a for a in args if not a.startswith("--")]
        copies.append((paths[:-1], paths[-1]))
    return copies


def _pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def test_every_copy_source_exists():
    copies = _copies(_instructions(DOCKERFILE.read_text()))
    assert copies, "no COPY found: the parser or the Dockerfile changed"
    for sources, _ in copies:
        for src in sources:
            assert list(REPO.glob(src.rstrip("/"))), f"{DOCKERFILE.name}: COPY {src} names nothing in the repository"


def test_the_image_copies_what_the_package_build_needs():
    copied = {src.rstrip("/") for sources, _ in _copies(_instructions(DOCKERFILE.read_text())) for src in sources}
    project = _pyproject()
    needed = {"pyproject.toml", project["project"]["readme"]}
    needed |= {folder.rstrip("/") for folder in project["tool"]["setuptools"]["package-dir"].values()}
    assert needed <= copied, f"{DOCKERFILE.name} does not copy {sorted(needed - copied)}"


def test_the_base_image_torch_meets_the_pyproject_floor():
    bases = [rest for word, rest in _instructions(DOCKERFILE.read_text()) if word == "FROM"]
    m = re.match(r"pytorch/pytorch:(\d+\.\d+(?:\.\d+)?)", bases[-1])
    assert m, f"the final stage's base {bases[-1]!r} is not a pytorch/pytorch:<version>-... image"
    torch_req = next(Requirement(d) for d in _pyproject()["project"]["dependencies"] if Requirement(d).name == "torch")
    assert torch_req.specifier.contains(Version(m.group(1))), f"image torch {m.group(1)} vs pyproject {torch_req}"


def test_the_parser_reads_continuations_flags_and_json_form():
    text = 'FROM x\n# a comment\nCOPY --chown=1:1 a/ \\\n    b c/\nCOPY ["d", "e/"]\nCOPY --from=build /x /y\n'
    assert _copies(_instructions(text)) == [(["a/", "b"], "c/"), (["d"], "e/")]
