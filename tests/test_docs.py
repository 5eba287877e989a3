"""The project's docs point at things that exist: every relative link, and every file path in backticks."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.conftest import REPO

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")
# `benchmarks/x.py`, `examples/a.toml`, `docs/b.md`, `slurm/c.sh` ... named in backticks.
FOLDERS = "benchmarks|examples|docs|slurm|emulator|rl_agent|pools|analysis|tests"
PATH = re.compile(rf"`((?:{FOLDERS})/[\w./-]+\.(?:py|toml|md|sh))`")


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_relative_links_and_named_files_exist(doc: Path) -> None:
    text = doc.read_text()
    missing = []
    for target in LINK.findall(text):
        if "://" in target or target.startswith("mailto:"):
            continue
        if not (doc.parent / target).exists():
            missing.append(target)
    missing += [p for p in PATH.findall(text) if not (REPO / p).exists()]
    assert not missing, f"{doc.name} names files that do not exist: {missing}"
