"""RTP packets are attributed to a call and a side by the SDP-announced addresses."""

from __future__ import annotations

import socket

from callcap.capture.media import MAX_LEARNED_PER_CALL, MediaRouter, format_endpoint, pack_ip


def ip(text: str) -> bytes:
    packed = pack_ip(text)
    assert packed is not None
    return packed


def test_packet_to_an_announced_address_comes_from_the_other_side() -> None:
    r = MediaRouter()
    assert r.announce("c1", "caller", "10.0.0.1", 4000)
    assert r.announce("c1", "callee", "10.0.0.2", 5000)
    assert r.match(ip("10.0.0.2"), 5000, ip("10.0.0.1"), 4000) == ("c1", "callee")
    assert r.match(ip("10.0.0.1"), 4000, ip("10.0.0.2"), 5000) == ("c1", "caller")


def test_nat_sender_is_matched_by_destination_and_learned_for_the_reverse_direction() -> None:
    r = MediaRouter()
    r.announce("c1", "caller", "192.168.1.10", 4000)  # private address in the caller's SDP
    r.announce("c1", "callee", "10.0.0.2", 5000)
    public = ip("203.0.113.7")
    # Caller's packets arrive from its NAT's public address to the callee's announced port.
    assert r.match(public, 61000, ip("10.0.0.2"), 5000) == ("c1", "caller")
    # The callee answers to that public address, which no SDP named: learned above.
    assert r.match(ip("10.0.0.2"), 5000, public, 61000) == ("c1", "callee")


def test_symmetric_source_matches_when_destination_is_unknown() -> None:
    r = MediaRouter()
    r.announce("c1", "callee", "10.0.0.2", 5000)
    assert r.match(ip("10.0.0.2"), 5000, ip("198.51.100.1"), 7000) == ("c1", "callee")


def test_hold_and_disabled_streams_are_not_routable() -> None:
    r = MediaRouter()
    assert not r.announce("c1", "caller", "0.0.0.0", 4000)
    assert not r.announce("c1", "caller", "10.0.0.1", 0)
    assert not r.announce("c1", "caller", None, 4000)
    assert not r.announce("c1", "caller", "example.com", 4000)
    assert len(r) == 0


def test_newest_announcement_of_a_recycled_port_wins_and_forget_releases_it() -> None:
    r = MediaRouter()
    r.announce("old", "caller", "10.0.0.1", 4000)
    r.announce("new", "callee", "10.0.0.1", 4000)
    assert r.match(ip("10.9.9.9"), 1, ip("10.0.0.1"), 4000) == ("new", "caller")
    assert r.conflicts == 1
    r.forget_call("old")  # must not remove the route the new call owns
    assert r.match(ip("10.9.9.9"), 1, ip("10.0.0.1"), 4000) == ("new", "caller")
    r.forget_call("new")
    assert r.match(ip("10.9.9.9"), 1, ip("10.0.0.1"), 4000) is None
    assert len(r) == 0


def test_learning_is_bounded_per_call() -> None:
    r = MediaRouter()
    r.announce("c1", "callee", "10.0.0.2", 5000)
    for port in range(20):
        r.match(ip("203.0.113.7"), 30000 + port, ip("10.0.0.2"), 5000)
    assert len(r) == 1 + MAX_LEARNED_PER_CALL


def test_ipv6_and_mapped_addresses() -> None:
    r = MediaRouter()
    r.announce("c1", "caller", "2001:db8::1", 4000)
    r.announce("c1", "callee", "::ffff:10.0.0.2", 5000)
    assert r.match(
        ip("2001:db8::2"), 9, socket.inet_pton(socket.AF_INET6, "2001:db8::1"), 4000
    ) == ("c1", "callee")
    assert r.match(ip("10.0.0.1"), 9, ip("10.0.0.2"), 5000) == ("c1", "caller")
    assert format_endpoint(ip("2001:db8::1"), 4000) == "[2001:db8::1]:4000"
    assert format_endpoint(ip("10.0.0.2"), 5000) == "10.0.0.2:5000"
