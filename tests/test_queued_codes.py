"""G.711 waits in a call's queue as codes and is decoded when written: the written samples
are those an eager decode gives, whatever mixes in one write (codecs, decoded samples,
overlaps, a packet straddling the last write)."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
from hypothesis import given, settings
from hypothesis import strategies as st

from callcap.codecs.g711 import CODE_PER_SAMPLE, DECODERS, decode_alaw, decode_ulaw
from callcap.recorder import Queued, _cut, _placement

_KINDS = ("PCMU", "PCMA", "pcm")


def _place(placed: tuple[object, npt.NDArray[np.int16]], length: int) -> npt.NDArray[np.int16]:
    index, samples = placed
    out = np.zeros(length, dtype=np.int16)
    out[index] = samples  # type: ignore[index]
    return out


@st.composite
def _queues(draw: st.DrawFn) -> tuple[list[Queued], list[Queued], int]:
    """Items as the recorder queues them, and the same items decoded at once."""
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    start = draw(st.integers(0, 400))
    pos = start - draw(st.integers(0, 80))  # the first may straddle the last write
    lazy: list[Queued] = []
    eager: list[Queued] = []
    for _ in range(draw(st.integers(1, 12))):
        size = draw(st.sampled_from([1, 2, 80, 160, 161]))
        kind = draw(st.sampled_from(_KINDS))
        codes = rng.integers(0, 256, size, dtype=np.uint8)
        if kind == "pcm":
            pcm = decode_ulaw(codes.tobytes())
            lazy.append((pos, pcm, None))
        else:
            decoder = DECODERS[kind]
            lazy.append((pos, codes, decoder))
            pcm = decoder(codes.tobytes())
        eager.append((pos, pcm, None))
        # back to back mostly; now and then a hole, or an overlap (a duplicate)
        pos += size + draw(st.sampled_from([0, 0, 0, 40, -40]))
    return lazy, eager, start


@settings(max_examples=300, deadline=None)
@given(_queues())
def test_codes_queued_are_written_as_an_eager_decode_would_write_them(
    queues: tuple[list[Queued], list[Queued], int],
) -> None:
    lazy, eager, start = queues
    length = max(p + len(d) for p, d, _ in eager) - start + 1
    if length <= 0:
        return
    assert np.array_equal(
        _place(_placement(lazy, start), max(length, 1)),
        _place(_placement(eager, start), max(length, 1)),
    )


@settings(max_examples=300, deadline=None)
@given(_queues(), st.integers(-100, 2400))
def test_a_write_up_to_a_horizon_then_the_rest_writes_what_one_write_would(
    queues: tuple[list[Queued], list[Queued], int], at: int
) -> None:
    """Items across the horizon wait as their tails; overlaps are still won by later items."""
    lazy, _eager, start = queues
    end = max(p + len(d) for p, d, _ in lazy)
    if end <= start:
        return
    horizon = min(max(start, start + at), end)
    taken, rest = _cut(lazy, horizon)
    assert all(p + len(d) <= horizon for p, d, _ in taken)
    assert all(p >= horizon for p, _d, _ in rest)
    first = _place(_placement(taken, start), horizon - start) if taken else None
    second = _place(_placement(rest, horizon), end - horizon) if rest else None
    parts = [np.zeros(horizon - start, np.int16) if first is None else first[: horizon - start]]
    parts.append(np.zeros(end - horizon, np.int16) if second is None else second)
    assert np.array_equal(np.concatenate(parts), _place(_placement(lazy, start), end - start))


def test_only_stateless_one_byte_a_sample_decoders_wait_as_codes() -> None:
    assert {decode_ulaw, decode_alaw} == CODE_PER_SAMPLE
    for decoder in CODE_PER_SAMPLE:
        codes = np.arange(256, dtype=np.uint8)
        whole = decoder(codes)
        assert len(whole) == len(codes)  # one sample a code
        parts = np.concatenate([decoder(codes[:77]), decoder(codes[77:])])
        assert np.array_equal(whole, parts)  # no state from one packet to the next
        assert np.array_equal(whole, decoder(codes.tobytes()))  # an array of codes or bytes
