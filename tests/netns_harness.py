"""Network namespaces the tests create for themselves (and always remove).

A fresh namespace has a loopback nobody else uses, so a test that sniffs it sees only its
own calls, whatever else runs on the machine; a pair joined by a veth link is a tiny real
network with Ethernet framing and addresses that exist only inside it.
"""

from __future__ import annotations

import contextlib
import secrets
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True, slots=True)
class NetnsPair:
    a: str
    b: str
    veth_a: str
    veth_b: str
    ip_a: str
    ip_b: str


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


def _listed() -> str:
    return subprocess.run(
        ["ip", "netns", "list"], capture_output=True, text=True, check=True, timeout=30
    ).stdout


@contextlib.contextmanager
def _namespaces(*names: str) -> Iterator[None]:
    created: list[str] = []
    try:
        for ns in names:
            _ip("netns", "add", ns)
            created.append(ns)
            _ip("-n", ns, "link", "set", "lo", "up")
        yield
    finally:
        for ns in created:  # deleting a namespace deletes the interfaces inside it
            subprocess.run(["ip", "netns", "delete", ns], check=False, timeout=30)
    listed = _listed()
    assert not [ns for ns in names if ns in listed], listed


@contextlib.contextmanager
def isolated_netns() -> Iterator[str]:
    """One namespace with only ``lo`` (127.0.0.1), named uniquely for this run."""
    name = f"callcap-{secrets.token_hex(4)}"
    with _namespaces(name):
        yield name


@contextlib.contextmanager
def netns_pair() -> Iterator[NetnsPair]:
    """Namespaces A and B joined by a veth pair, with A=.1 and B=.2 of a private /24."""
    tag = secrets.token_hex(3)
    net = f"10.{200 + secrets.randbelow(50)}.{secrets.randbelow(250) + 1}"
    pair = NetnsPair(
        f"callcap-a-{tag}", f"callcap-b-{tag}", f"cc{tag}a", f"cc{tag}b", f"{net}.1", f"{net}.2"
    )
    with _namespaces(pair.a, pair.b):
        _ip(
            "link", "add", pair.veth_a, "netns", pair.a, "type", "veth",
            "peer", "name", pair.veth_b, "netns", pair.b,
        )  # fmt: skip
        for ns, dev, addr in ((pair.a, pair.veth_a, pair.ip_a), (pair.b, pair.veth_b, pair.ip_b)):
            _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
            _ip("-n", ns, "link", "set", dev, "up")
        yield pair


def netns_exec(name: str) -> list[str]:
    """The command prefix that runs a program inside namespace ``name``."""
    return ["ip", "netns", "exec", name]


def tcpreplay(
    ns: str, interface: str, pcap: Path, *extra: str, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    """Send a capture's frames out of ``interface`` inside namespace ``ns`` with tcpreplay,
    at the pace they were recorded (unless ``extra`` says otherwise)."""
    return subprocess.run(
        [*netns_exec(ns), "tcpreplay", "-q", f"--intf1={interface}", *extra, str(pcap)],
        capture_output=True,
        text=True,
        check=True,
        timeout=timeout,
    )


__all__ = ["NetnsPair", "isolated_netns", "netns_exec", "netns_pair", "tcpreplay"]
