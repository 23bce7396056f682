"""Shared fixtures: where the public capture corpus lives; network namespaces for live tests."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import netns_harness
import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
DATA_DIR = Path(__file__).resolve().parent / "data"


CORPUS_DIR = DATA_DIR / "corpus"


def corpus_dir() -> Path:
    """The corpus in the repository (``tests/data/corpus``), or ``$CALLCAP_CORPUS``."""
    override = os.environ.get("CALLCAP_CORPUS")
    return Path(override) if override else CORPUS_DIR


@pytest.fixture(scope="session")
def corpus() -> Path:
    """The public SIP/RTP capture corpus (``tests/data/corpus``: MANIFEST.md says where each
    file comes from and under which licence)."""
    path = corpus_dir()
    if not (path / "facts.json").is_file():
        pytest.fail(f"capture corpus not found at {path} (set CALLCAP_CORPUS)")
    return path


@pytest.fixture(scope="session")
def corpus_facts(corpus: Path) -> dict[str, Any]:
    """tshark's view of every corpus capture, keyed by file name."""
    facts = json.loads((corpus / "facts.json").read_text(encoding="utf-8"))
    return {entry["file"]: entry for entry in facts["files"]}


@pytest.fixture(scope="session")
def data_dir() -> Path:
    return DATA_DIR


@pytest.fixture
def netns() -> Iterator[str]:
    """A fresh network namespace of this test's own (its loopback sees no other traffic)."""
    with netns_harness.isolated_netns() as name:
        yield name


@pytest.fixture
def netns_pair() -> Iterator[netns_harness.NetnsPair]:
    """Two namespaces joined by a veth link, removed after the test."""
    with netns_harness.netns_pair() as pair:
        yield pair
