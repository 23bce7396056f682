"""Which call and side an RTP packet belongs to, from the addresses SDP announced.

An SDP ``c=``/``m=`` pair says where a party *receives* media.  A packet sent to that address
comes from the other party; a packet sent *from* it comes from that party, because nearly all
equipment uses symmetric RTP (RFC 4961) — which is also how a recorder copes with NAT, where
the address in the SDP is private and the packets flow between public ones.  When a packet
matches by destination but comes from an address nobody announced, that source is learned as
the sender's real address (bounded per call), so the reverse direction matches too.

Keys are ``(packed IP bytes, port)`` so the per-packet lookup never formats an address.
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass, field

MAX_LEARNED_PER_CALL = 8


def other_side(side: str) -> str:
    return "callee" if side == "caller" else "caller"


def pack_ip(address: str) -> bytes | None:
    """Text address → packed bytes (4 or 16), or None if it is not a unicast IP literal."""
    try:
        ip = ipaddress.ip_address(address.strip("[]"))
    except ValueError:
        return None
    if ip.is_unspecified or ip.is_multicast:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped.packed
    return ip.packed


def format_endpoint(ip: bytes, port: int) -> str:
    """``ip:port`` with IPv6 in brackets (RFC 3986 §3.2.2 style), for sidecars and logs."""
    return endpoint_text(ip_text(ip), port)


def endpoint_text(ip: str, port: int) -> str:
    """:func:`format_endpoint` for an address already in text form."""
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


def ip_text(ip: bytes) -> str:
    return socket.inet_ntop(socket.AF_INET6 if len(ip) == 16 else socket.AF_INET, ip)


@dataclass(slots=True)
class Route:
    """An address that belongs to ``owner`` (the party that receives RTP there)."""

    call_id: str
    owner: str
    learned: bool = False


@dataclass(slots=True)
class _CallKeys:
    keys: set[tuple[bytes, int]] = field(default_factory=set)
    learned: int = 0


class MediaRouter:
    """Maps RTP packets to ``(call_id, sending side)`` by the SDP-announced addresses."""

    __slots__ = ("_by_call", "_routes", "conflicts")

    def __init__(self) -> None:
        self._routes: dict[tuple[bytes, int], Route] = {}
        self._by_call: dict[str, _CallKeys] = {}
        self.conflicts = 0

    def __len__(self) -> int:
        return len(self._routes)

    def announce(self, call_id: str, owner: str, address: str | None, port: int) -> bool:
        """Register that ``owner`` of ``call_id`` receives RTP at ``address:port``.

        The newest announcement of an address wins: ports are recycled between calls, and
        a call that announces an address now is the one that will receive there.  Returns
        False when the address cannot carry media (port 0, ``0.0.0.0`` hold, no address).
        """
        if address is None or not 0 < port < 65536:
            return False
        packed = pack_ip(address)
        if packed is None:
            return False
        key = (packed, port)
        old = self._routes.get(key)
        if old is not None and old.call_id != call_id:
            self.conflicts += 1
            prev = self._by_call.get(old.call_id)
            if prev is not None:
                prev.keys.discard(key)
        self._routes[key] = Route(call_id, owner)
        self._by_call.setdefault(call_id, _CallKeys()).keys.add(key)
        return True

    def match(self, src: bytes, sport: int, dst: bytes, dport: int) -> tuple[str, str] | None:
        """``(call_id, sender side)`` for a packet, or None if no call announced either end."""
        route = self._routes.get((dst, dport))
        if route is not None:
            sender = other_side(route.owner)
            back = self._routes.get((src, sport))
            if back is None:
                self._learn(route.call_id, sender, (src, sport))
            return route.call_id, sender
        route = self._routes.get((src, sport))
        if route is not None:
            return route.call_id, route.owner
        return None

    def forget_call(self, call_id: str) -> None:
        entry = self._by_call.pop(call_id, None)
        if entry is None:
            return
        for key in entry.keys:
            route = self._routes.get(key)
            if route is not None and route.call_id == call_id:
                del self._routes[key]

    def _learn(self, call_id: str, owner: str, key: tuple[bytes, int]) -> None:
        entry = self._by_call.setdefault(call_id, _CallKeys())
        if entry.learned >= MAX_LEARNED_PER_CALL:
            return
        entry.learned += 1
        entry.keys.add(key)
        self._routes[key] = Route(call_id, owner, learned=True)
