"""Byte-mutated corpus captures: no crash, no hang, bounded memory, valid output.

The CI subset of ``bench/fuzz_corpus.py`` (the full run is a bench script, with its
counts in the closing notes): the corpus captures up to 200 kB, each with a few bytes
changed by the seeded mutator, through the recorder as ``record`` and as the daemon's
replay path feed it.
"""

from __future__ import annotations

import random

import pytest
from fuzz_corpus import corpus_files, fuzz, mutate

pytestmark = pytest.mark.slow


def test_the_mutator_is_seeded_and_mutates() -> None:
    data = bytes(range(256)) * 8
    a = [mutate(data, random.Random(7)) for _ in range(3)]
    b = [mutate(data, random.Random(7)) for _ in range(3)]
    assert a == b and all(m != data for m in a)


@pytest.mark.parametrize("seed", [1, 2])
def test_mutated_captures_are_recorded_or_refused_never_crash(seed: int) -> None:
    files = corpus_files(max_bytes=200_000)
    assert len(files) >= 15
    counts, failures = fuzz(600, seed, files=files, time_limit=30.0, max_rss_mb=1500.0)
    assert failures == [] and counts == {"ok": 600}
