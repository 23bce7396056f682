"""RFC 4733 telephone-events: DTMF digits carried as RTP payloads instead of tones.

An event is sent as a series of packets sharing the RTP timestamp of its start, each with a
growing duration, and ends with the E bit set — usually three times, for robustness
(RFC 4733 §2.5.1).  :class:`EventTracker` collapses all of them into one digit per event.
Event codes outside the DTMF range (flash aside) are counted and ignored: flows mislabelled
as telephone-event exist in the wild and must not invent digits.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

_EVENT = struct.Struct("!BBH")

MAX_EVENT_PAYLOAD = 64
"""Longest payload still taken as telephone-events.

An event block is 4 bytes (RFC 4733 §2.3); some gateways pad it (SIP_DTMF2.pcap sends 6),
and redundant blocks make a few more.  Anything longer is a media frame on a mislabelled
payload type (nDPI's rtp.pcapng has video on PT 101), whose first byte would otherwise be
read as a digit about one time in sixteen.
"""

EVENT_DIGITS: Mapping[int, str] = MappingProxyType(
    {
        **{i: str(i) for i in range(10)},
        10: "*",
        11: "#",
        12: "A",
        13: "B",
        14: "C",
        15: "D",
        16: "flash",
    }
)


@dataclass(frozen=True, slots=True)
class TelephoneEvent:
    event: int
    end: bool
    volume: int
    duration: int

    @classmethod
    def parse(cls, payload: bytes | bytearray | memoryview) -> TelephoneEvent:
        """The first event block of a payload (RFC 4733 §2.3; redundant blocks follow it)."""
        if len(payload) < 4:
            raise ValueError(f"telephone-event payload needs 4 bytes, got {len(payload)}")
        event, flags, duration = _EVENT.unpack_from(payload)
        return cls(event=event, end=bool(flags & 0x80), volume=flags & 0x3F, duration=duration)


@dataclass(frozen=True, slots=True)
class DtmfDigit:
    digit: str
    start_ts: int  # RTP timestamp of the event's start
    duration: int  # in RTP timestamp units
    ended: bool  # False if the end packets never arrived


class EventTracker:
    """One RTP stream's telephone-events → one :class:`DtmfDigit` per event (sans-IO)."""

    __slots__ = ("_current", "_done", "ignored", "malformed")

    def __init__(self) -> None:
        self._current: tuple[int, int, int] | None = None  # (start ts, event, duration)
        self._done: dict[int, None] = {}  # start timestamps of events already reported
        self.ignored = 0
        self.malformed = 0

    def feed(self, rtp_timestamp: int, payload: bytes) -> list[DtmfDigit]:
        """One telephone-event packet in; the digits it completes out (usually none).

        The RTP timestamp identifies the event (RFC 4733 §2.5.1.1): updates and the repeated
        end packets (§2.5.1.4) of one event collapse into one digit, returned when its first
        E-bit packet arrives.  A packet with a new timestamp while the previous event never
        ended returns that event with ``ended=False`` (its end packets were lost).  Non-DTMF
        event codes and payloads over :data:`MAX_EVENT_PAYLOAD` bytes are counted in
        ``ignored``, payloads under 4 bytes in ``malformed``.
        """
        if len(payload) > MAX_EVENT_PAYLOAD:
            self.ignored += 1  # a media frame under a telephone-event label, not an event
            return []
        try:
            ev = TelephoneEvent.parse(payload)
        except ValueError:
            self.malformed += 1
            return []
        if ev.event not in EVENT_DIGITS:
            self.ignored += 1
            return []
        if rtp_timestamp in self._done:
            return []  # an end-packet repeat, or an update after the end
        out: list[DtmfDigit] = []
        cur = self._current
        if cur is not None and cur[0] != rtp_timestamp:
            out.append(DtmfDigit(EVENT_DIGITS[cur[1]], cur[0], cur[2], ended=False))
            self._remember(cur[0])
            cur = None
        duration = max(ev.duration, cur[2] if cur is not None else 0)
        if ev.end:
            out.append(DtmfDigit(EVENT_DIGITS[ev.event], rtp_timestamp, duration, ended=True))
            self._remember(rtp_timestamp)
            self._current = None
        else:
            self._current = (rtp_timestamp, ev.event, duration)
        return out

    @property
    def open_since(self) -> int | None:
        """RTP timestamp at which the event still under way began (a key held down, its
        end packets not come yet), or None."""
        return None if self._current is None else self._current[0]

    def flush(self) -> list[DtmfDigit]:
        """The event still open when the stream ends (its end packets were lost)."""
        cur = self._current
        self._current = None
        if cur is None:
            return []
        self._remember(cur[0])
        return [DtmfDigit(EVENT_DIGITS[cur[1]], cur[0], cur[2], ended=False)]

    def _remember(self, ts: int) -> None:
        self._done[ts] = None
        if len(self._done) > 64:
            del self._done[next(iter(self._done))]
