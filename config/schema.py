"""The typed configuration of callcap: frozen dataclasses, the only config type past the loader.

The YAML loader (:mod:`callcap.config.loader`) converts a document into these classes by
reading their type hints, so the schema *is* these declarations: a new key is a new field.
Per-field rules travel in ``field(metadata=…)`` so they sit next to the field they guard:

``check``
    ``(min, max)`` — an inclusive numeric range (either end may be ``None`` for "open"); on a
    tuple field it applies to every element, so an error names ``sip_ports[1]``. Or a callable
    taking the converted value and returning a problem sentence, or ``None`` when valid. Or a
    list of such rules, applied in order.
``octal``
    ``True`` — the value is a file mode written as an octal string (``"0640"``).
``internal``
    ``True`` — filled in by the loader, never read from YAML (``Config.source``).
``unique``
    On a tuple of dataclasses, the name of an attribute no two items may share (rule
    names); the error points at the repeated one.

Two more hooks live on classes: a class with ``parse(text)`` and ``EXPECTED`` (a phrase such
as "a duration like 90d") is read from a YAML string (:class:`Duration`, :class:`Network`;
:class:`Space`, whose ``TAKES_INTEGERS`` is true, from a plain whole number too),
and a dataclass with ``config_problems()`` returning ``(field, problem)`` pairs gets checks
across its fields, each located to that field's line.

This module imports nothing of callcap and raises plain ``ValueError`` (from
:meth:`Duration.parse`); the loader turns every problem into a located ``ConfigError``.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

#: A per-field rule: an inclusive ``(min, max)`` range or a callable returning a problem.
Check = tuple[float | None, float | None] | Callable[[Any], str | None]
#: What ``metadata["check"]`` may hold: one rule or a list of them.
Checks = Check | list[Check]

_DURATION_UNITS: dict[str, int] = {
    "s": 1,
    "m": 60,
    "h": 3600,
    "d": 86400,
    "w": 7 * 86400,
    "y": 365 * 86400,
}
_DURATION_RE = re.compile(r"([0-9]{1,9})([smhdwy])")


@dataclass(frozen=True, slots=True)
class Duration:
    """A span written the way retention policies are (``90d``, ``12w``, ``7y``).

    ``text`` is kept as written so the sidecar can echo the policy verbatim; ``seconds`` is
    what arithmetic uses. A year is 365 days: retention law counts calendar years, but a
    recording kept a day longer in a leap year is the safe side of that rounding.
    """

    text: str
    seconds: int

    MAX_SECONDS: ClassVar[int] = 100 * 365 * 86400
    EXPECTED: ClassVar[str] = "a duration like 90d"

    @classmethod
    def parse(cls, text: str) -> Duration:
        """Parse ``<digits><unit>`` with unit one of s, m, h, d, w, y; ``0d`` is allowed.

        Capped at a century: beyond it a timestamp ``end + keep`` stops being a date any
        filesystem or JSON consumer handles, and no policy means it.
        """
        match = _DURATION_RE.fullmatch(text)
        if match is None:
            raise ValueError(
                f"expected a duration like 90d (a whole number and one of s, m, h, d, w, y), "
                f"got {text[:40]!r}"
            )
        seconds = int(match.group(1)) * _DURATION_UNITS[match.group(2)]
        if seconds > cls.MAX_SECONDS:
            raise ValueError(f"must be at most 100y, got {text!r}")
        return cls(text, seconds)

    def __str__(self) -> str:
        return self.text


_SPACE_UNITS: dict[str, int] = {
    "": 1,
    "B": 1,
    "K": 1000,
    "KB": 1000,
    "KIB": 1 << 10,
    "M": 1000**2,
    "MB": 1000**2,
    "MIB": 1 << 20,
    "G": 1000**3,
    "GB": 1000**3,
    "GIB": 1 << 30,
    "T": 1000**4,
    "TB": 1000**4,
    "TIB": 1 << 40,
}
_SPACE_RE = re.compile(r"([0-9]{1,15})(?:\.([0-9]{1,3}))? ?([A-Za-z]{0,3}|%)")


@dataclass(frozen=True, slots=True)
class Space:
    """An amount of disk space: bytes with an optional unit (``512MiB``, ``2GB``, ``0``) or
    a share of the filesystem it applies to (``5%``).

    ``text`` is kept as written for messages; :meth:`of` gives the bytes on a filesystem of
    a given size (a share is only known there).
    """

    text: str
    bytes: int
    percent: float | None = None

    EXPECTED: ClassVar[str] = "a size like 512MiB or a share like 5%"
    TAKES_INTEGERS: ClassVar[bool] = True  # a plain number of bytes

    @classmethod
    def parse(cls, text: str) -> Space:
        match = _SPACE_RE.fullmatch(text.strip())
        if match is None:
            raise ValueError(f"expected {cls.EXPECTED}, got {text[:40]!r}")
        whole, frac, unit = match.groups()
        number = float(f"{whole}.{frac or 0}")
        if unit == "%":
            if number > 100:
                raise ValueError(f"a share must be at most 100%, got {text!r}")
            return cls(text, 0, number)
        scale = _SPACE_UNITS.get(unit.upper())
        if scale is None:
            raise ValueError(
                f"unknown unit {unit!r} in {text!r}"
                " (use B, KiB, MiB, GiB, TiB, KB, MB, GB, TB or %)"
            )
        return cls(text, round(number * scale))

    def of(self, total: int) -> int:
        """The bytes this amount is on a filesystem of ``total`` bytes."""
        return self.bytes if self.percent is None else round(total * self.percent / 100)

    def __str__(self) -> str:
        return self.text


def _bytes_only(value: Space) -> str | None:
    return None if value.percent is None else f"must be a size in bytes, not a share ({value})"


def _positive(value: float) -> str | None:
    return None if value > 0 else f"must be greater than 0, got {value:g}"


def _non_empty(value: tuple[object, ...] | str) -> str | None:
    return None if len(value) > 0 else "must not be empty"


def _port_range(value: tuple[int, int] | None) -> str | None:
    if value is None:
        return None
    low, high = value
    for port in value:
        if not 1 <= port <= 65535:
            return f"ports must be between 1 and 65535, got {port}"
    return None if low <= high else f"low port must not exceed high port, got [{low}, {high}]"


def _ring_block(value: int) -> str | None:
    if value < 4096 or value > 1 << 28 or value & (value - 1):
        return f"must be a power of two from 4096 to 268435456 bytes, got {value}"
    return None


def _workers(value: int | None) -> str | None:
    if value is None or 1 <= value <= 64:
        return None
    return f"must be between 1 and 64 (or null: one per available core), got {value}"


@dataclass(frozen=True, slots=True)
class RingConfig:
    """The memory-mapped ring each live capture socket receives into (TPACKET_V3).

    The kernel fills one block at a time and hands it over when it is full or
    ``retire_timeout_ms`` after its first frame; the ring (``blocks`` × ``block_size``)
    is what absorbs the recorder's pauses: when every block is waiting to be read, the
    kernel drops frames (counted, logged as ``capture_overrun``).  A G.711 call is about
    100 frames/s of some 300 bytes in the ring: 2,000 calls fill 60 MB/s, so the default
    128 MiB ring holds two seconds of them per worker — what a set-up burst of 2,000 calls
    within two seconds needs (64 MiB overran there: bench/README.md, live ladder).
    """

    block_size: int = field(default=1 << 20, metadata={"check": _ring_block})
    blocks: int = field(default=128, metadata={"check": (2, 65536)})
    retire_timeout_ms: int = field(default=20, metadata={"check": (1, 1000)})


@dataclass(frozen=True, slots=True)
class CaptureConfig:
    """What to sniff and what to treat as SIP."""

    #: UDP/TCP ports always treated as SIP (RFC 3261 §18.1: 5060, and 5061 for TLS).
    #: Never empty: the live capture filter is built from these ports.
    sip_ports: tuple[int, ...] = field(
        default=(5060, 5061), metadata={"check": [_non_empty, (1, 65535)]}
    )
    #: Also recognise SIP on other ports by its first line (RFC 3261 §7.1 request/status line).
    detect_sip_any_port: bool = True
    #: Live daemon: interfaces to sniff; ``any`` is the Linux pseudo-interface.
    interfaces: tuple[str, ...] = field(default=("any",), metadata={"check": _non_empty})
    promiscuous: bool = False
    #: Live BPF filter: ``None`` captures all UDP; else the inclusive ``[low, high]`` ports.
    rtp_port_range: tuple[int, int] | None = field(default=None, metadata={"check": _port_range})
    snaplen: int = field(default=65535, metadata={"check": (64, 262144)})
    ring: RingConfig = field(default_factory=RingConfig)
    #: Live daemon: recording processes; each records the calls whose Call-ID falls to it
    #: (:mod:`callcap.sharding`).  ``None``: one per available core, at most 8.
    workers: int | None = field(default=None, metadata={"check": _workers})


@dataclass(frozen=True, slots=True)
class CallsConfig:
    """When a call is over, and how many may be tracked at once."""

    #: No SIP and no RTP for this long ends a call with end_reason ``timeout``.
    inactivity_timeout_s: float = field(default=300.0, metadata={"check": _positive})
    #: After 401/407/CANCEL, wait this long for a retried INVITE or the final response:
    #: RFC 3261 §17.1.1.2 Timer B = 64*T1 = 32 s is how long a client keeps trying.
    failed_linger_s: float = field(default=32.0, metadata={"check": (0, None)})
    max_active_calls: int = field(default=10000, metadata={"check": (1, None)})
    #: INVITEs with no progress from the far end yet (no 18x, no 2xx) tracked at once;
    #: beyond it the oldest of them is evicted (counted ``pending_evicted``).
    max_pending_calls: int = field(default=4000, metadata={"check": (1, None)})


@dataclass(frozen=True, slots=True)
class RtpConfig:
    """Reordering and write-out granularity of the media path."""

    jitter_window_ms: int = field(default=200, metadata={"check": (20, 5000)})
    #: Audio is written in blocks at most this long, bounding what a crash can lose.
    flush_interval_ms: int = field(default=1000, metadata={"check": (100, 1000)})


@dataclass(frozen=True, slots=True)
class RecordingConfig:
    """Where recordings go and with which permissions."""

    out_dir: str = field(default="/var/lib/callcap/recordings", metadata={"check": _non_empty})
    #: Write a sidecar (no audio) for failed or cancelled calls too.
    record_failed_calls: bool = False
    file_mode: int = field(default=0o640, metadata={"octal": True})
    dir_mode: int = field(default=0o750, metadata={"octal": True})


@dataclass(frozen=True, slots=True)
class StorageConfig:
    """Room on the output filesystem (:mod:`callcap.storage.reserve` says what happens
    when it runs out)."""

    #: Below this much free space no new recording is started (``disk_low``); calls in
    #: flight go on while there is room.  ``0`` turns the check off.
    min_free: Space = field(default_factory=lambda: Space.parse("2%"))
    #: Kept back so that a full disk still lets the calls in flight be published, their
    #: sidecars and audit entries written.  ``0`` keeps none.
    reserve: Space = field(
        default_factory=lambda: Space.parse("16MiB"), metadata={"check": _bytes_only}
    )


DTMF_DIGITS = "0123456789*#ABCD"
_HEADER_NAME_RE = re.compile(r"[A-Za-z0-9!#$%&'*+.^_`|~-]{1,64}")


@dataclass(frozen=True, slots=True)
class Network:
    """An IP network written in CIDR form (``10.1.0.0/16``, ``2001:db8::/32``, or one address).

    ``text`` keeps what was written for messages; ``network`` is what membership tests use.
    Host bits must be zero (``10.1.2.3/16`` is refused): such a typo usually means a
    different network than the one intended.
    """

    text: str
    network: ipaddress.IPv4Network | ipaddress.IPv6Network

    EXPECTED: ClassVar[str] = "an IP network like 10.1.0.0/16"

    @classmethod
    def parse(cls, text: str) -> Network:
        try:
            return cls(text, ipaddress.ip_network(text.strip(), strict=True))
        except ValueError as exc:
            raise ValueError(f"not an IP network: {exc}") from exc

    def __str__(self) -> str:
        return self.text


def _digit(value: str | None) -> str | None:
    if value is None or (len(value) == 1 and value in DTMF_DIGITS):
        return None
    return f"must be one DTMF digit (0-9, *, #, A-D), got {value[:20]!r}"


def _header_names(value: dict[str, str]) -> str | None:
    for name in value:
        if _HEADER_NAME_RE.fullmatch(name) is None:
            return f"not a SIP header name: {name[:40]!r}"
    return None


def _header_name(value: str) -> str | None:
    return _header_names({value: ""})


def _rule_name(value: str) -> str | None:
    if not value.strip():
        return "must not be empty"
    if len(value) > 64 or not value.isprintable():
        return "must be at most 64 printable characters"
    return None


@dataclass(frozen=True, slots=True)
class ConsentMatch:
    """Which calls a rule applies to; every listed condition must hold, an empty one always does.

    ``caller``/``callee`` are globs (only ``*`` and ``?`` are special) tried against the user
    part of the From/To URI and against the whole URI; ``trunk`` holds when either signalling
    peer of the INVITE (its source or destination IP) is inside one of the networks;
    ``header`` maps an INVITE header name (case-insensitive) to a glob its value must match.
    See :mod:`callcap.config.rules` for the exact semantics.
    """

    caller: tuple[str, ...] = ()
    callee: tuple[str, ...] = ()
    trunk: tuple[Network, ...] = ()
    header: dict[str, str] = field(default_factory=dict, metadata={"check": _header_names})

    def __hash__(self) -> int:  # the dict would make the generated hash fail; config is frozen
        return hash((self.caller, self.callee, self.trunk, tuple(sorted(self.header.items()))))


@dataclass(frozen=True, slots=True)
class RetentionMatch(ConsentMatch):
    """A consent match plus the call's final consent status (decided before retention is)."""

    consent_status: tuple[Literal["not_required", "granted", "refused", "missing"], ...] = ()

    def __hash__(self) -> int:
        return hash((ConsentMatch.__hash__(self), self.consent_status))


@dataclass(frozen=True, slots=True)
class SipHeaderEvidence:
    """A header whose value (a glob) in the INVITE signals the caller's consent."""

    name: str = field(metadata={"check": _header_name})
    value: str = field(metadata={"check": _non_empty})


@dataclass(frozen=True, slots=True)
class ConsentRule:
    """One consent regime for the calls ``match`` selects (first matching rule wins)."""

    name: str = field(metadata={"check": _rule_name})
    mode: Literal["one_party", "all_party"]
    match: ConsentMatch = field(default_factory=ConsentMatch)
    #: How consent may be given: keypad digits (RFC 4733 events or SIP INFO), a SIP header,
    #: or keypad tones heard in the audio.
    evidence: tuple[Literal["dtmf", "sip_header", "inband"], ...] = ()
    dtmf_digit: str = field(default="1", metadata={"check": _digit})
    optout_digit: str | None = field(default=None, metadata={"check": _digit})
    #: Whose keys count: the party asked for consent (the caller presses 1 to agree).
    dtmf_side: Literal["caller", "callee"] = "caller"
    #: Seconds after the answer within which consent must be given.
    within_s: float = field(default=30.0, metadata={"check": _positive})
    sip_header: SipHeaderEvidence | None = None
    on_missing: Literal["discard", "keep_flagged"] = "discard"

    def config_problems(self) -> list[tuple[str, str]]:
        """Checks across fields: ``(field, problem)`` pairs the loader locates to a line."""
        problems: list[tuple[str, str]] = []
        if self.mode == "all_party" and not self.evidence:
            problems.append(("evidence", "an all_party rule needs at least one evidence method"))
        if len(set(self.evidence)) != len(self.evidence):
            problems.append(("evidence", "lists a method twice"))
        if "sip_header" in self.evidence and self.sip_header is None:
            problems.append(("sip_header", "evidence sip_header needs sip_header {name, value}"))
        if self.optout_digit is not None and self.optout_digit == self.dtmf_digit:
            problems.append(("optout_digit", "must differ from dtmf_digit"))
        return problems


@dataclass(frozen=True, slots=True)
class ConsentDefault:
    """Consent regime applied when no rule matches."""

    mode: Literal["one_party", "all_party"] = "one_party"


@dataclass(frozen=True, slots=True)
class ConsentConfig:
    default: ConsentDefault = field(default_factory=ConsentDefault)
    #: Tried in order; the first rule whose ``match`` holds decides (no match: ``default``).
    rules: tuple[ConsentRule, ...] = field(default=(), metadata={"unique": "name"})


@dataclass(frozen=True, slots=True)
class RetentionDefault:
    """How long a recording is kept when no rule matches."""

    keep: Duration = field(default_factory=lambda: Duration.parse("90d"))


@dataclass(frozen=True, slots=True)
class RetentionRule:
    """How long the recordings ``match`` selects are kept (first matching rule wins)."""

    name: str = field(metadata={"check": _rule_name})
    keep: Duration
    match: RetentionMatch = field(default_factory=RetentionMatch)


@dataclass(frozen=True, slots=True)
class RetentionConfig:
    default: RetentionDefault = field(default_factory=RetentionDefault)
    rules: tuple[RetentionRule, ...] = field(default=(), metadata={"unique": "name"})
    #: The daemon deletes expired, unheld recordings this often; 0 turns the sweep off.
    sweep_interval_s: float = field(default=3600.0, metadata={"check": (0, None)})


def _key_sequence(value: str) -> str | None:
    if not value or len(value) > 8 or any(c not in "0123456789*#ABCD" for c in value):
        return f"must be 1 to 8 DTMF keys (0-9, *, #, A-D), got {value[:20]!r}"
    return None


@dataclass(frozen=True, slots=True)
class DtmfConfig:
    """Which DTMF sources are listened to besides RFC 4733 events and SIP INFO."""

    #: Detect keypad tones in the decoded audio (ITU-T Q.24 limits) on every call.  Off by
    #: default: one core analyses only about 75 calls in real time (bench/README.md), so it
    #: runs only where asked for — here, or for a consent rule's window (``evidence: inband``).
    inband: bool = False


@dataclass(frozen=True, slots=True)
class PciHeader:
    """A SIP header that pauses or resumes recording (re-INVITE, UPDATE, INFO …)."""

    name: str = field(default="X-Recording-Pause", metadata={"check": _non_empty})
    pause: str = field(default="on", metadata={"check": _non_empty})
    resume: str = field(default="off", metadata={"check": _non_empty})


@dataclass(frozen=True, slots=True)
class PciConfig:
    """Pausing the recording while card data is spoken or keyed (PCI DSS)."""

    #: The agent's side: only its keypad pauses and resumes.
    agent_side: Literal["caller", "callee"] = "callee"
    pause_dtmf: str = field(default="*7", metadata={"check": _key_sequence})
    resume_dtmf: str = field(default="*8", metadata={"check": _key_sequence})
    sip_header: PciHeader = field(default_factory=PciHeader)
    #: SIP INFO with this Content-Type whose body is the header's pause/resume value.
    info_content_type: str = field(
        default="application/x-callcap-pause", metadata={"check": _non_empty}
    )


@dataclass(frozen=True, slots=True)
class ControlConfig:
    """The daemon's local control socket (``callcap pause|resume``)."""

    #: UNIX socket path; null disables the control socket.
    socket: str | None = "/run/callcap/control.sock"
    #: Group owning the socket (mode 0660); null keeps the daemon's own group.
    group: str | None = None


@dataclass(frozen=True, slots=True)
class LoggingConfig:
    """Log rendering and the periods of the rate-limited and periodic events."""

    format: Literal["json", "console"] = "json"
    level: Literal["debug", "info", "warning", "error"] = "info"
    #: ``packet_dropped`` is logged at most once per interval per reason, with the count.
    drop_log_interval_s: float = field(default=10.0, metadata={"check": (0, None)})
    #: Period of the daemon's ``capture_stats`` event.
    stats_interval_s: float = field(default=60.0, metadata={"check": _positive})


@dataclass(frozen=True, slots=True)
class Config:
    """The whole configuration; ``source`` names the file it came from (for logs)."""

    capture: CaptureConfig = field(default_factory=CaptureConfig)
    calls: CallsConfig = field(default_factory=CallsConfig)
    rtp: RtpConfig = field(default_factory=RtpConfig)
    recording: RecordingConfig = field(default_factory=RecordingConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    consent: ConsentConfig = field(default_factory=ConsentConfig)
    retention: RetentionConfig = field(default_factory=RetentionConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    dtmf: DtmfConfig = field(default_factory=DtmfConfig)
    pci: PciConfig = field(default_factory=PciConfig)
    control: ControlConfig = field(default_factory=ControlConfig)
    source: str = field(default="<defaults>", metadata={"internal": True})
