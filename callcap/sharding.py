"""Which worker records a call: one stable function of its Call-ID, the same in every process.

Every worker sees every SIP message and tracks every dialog and every media route, so each
knows which call a packet belongs to; only the call's *owner* records it.  Tying ownership
to the Call-ID, not to addresses or ports, keeps a call in one worker and one file whatever
its media does later: a re-INVITE to new ports, a new SSRC, a codec change, a NAT'd source.
CRC-32 is plenty here: the point is an even, reproducible spread, not secrecy (a caller who
could pick Call-IDs to crowd one worker gains nothing the SIP flood limits do not bound).
"""

from __future__ import annotations

import zlib


def owner_of(call_id: str, workers: int) -> int:
    """The index (0 .. ``workers`` - 1) of the worker that records ``call_id``."""
    if workers <= 1:
        return 0
    return zlib.crc32(call_id.encode("utf-8", "surrogateescape")) % workers
