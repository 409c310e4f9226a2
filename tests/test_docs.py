"""The documentation a clone carries: README.md links to the spec in docs/, and every relative link in README.md and
docs/*.md points at a file of this repository (never outside it, e.g. ../shared)."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")  # [text](target)
DOCS = ("docs/mhc.md", "docs/architecture.md", "docs/parallel.md")


def _pages() -> list[Path]:
    return [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def test_readme_links_every_spec_page_in_docs():
    targets = set(LINK.findall((REPO / "README.md").read_text()))
    assert set(DOCS) <= targets, sorted(set(DOCS) - targets)


def test_every_relative_link_resolves_to_a_file_inside_the_repository():
    bad = []
    for page in _pages():
        for target in LINK.findall(page.read_text()):
            if re.match(r"[a-z]+:", target) or target.startswith("#"):  # http(s):, mailto:, an anchor on the page
                continue
            path = (page.parent / target.split("#")[0]).resolve()
            if not path.exists() or REPO not in path.parents:
                bad.append(f"{page.relative_to(REPO)}: {target}")
    assert not bad, bad


def test_no_page_points_outside_the_clone():
    for page in _pages():
        assert "../shared" not in page.read_text(), page
