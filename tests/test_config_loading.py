"""Valid YAML becomes typed, frozen config; the shipped default.yaml is exactly the defaults."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from callcap.config.loader import convert, default_config_path, load_config, load_config_text
from callcap.config.schema import (
    CaptureConfig,
    Config,
    ConsentDefault,
    Duration,
    LoggingConfig,
)
from callcap.errors import ConfigError

FULL = """\
capture:
  sip_ports: [5060, 5080]
  detect_sip_any_port: false
  interfaces: [eth0, eth1]
  promiscuous: true
  rtp_port_range: [10000, 20000]
  snaplen: 1500
calls:
  inactivity_timeout_s: 90          # an integer where a float is expected is fine
  failed_linger_s: 2.5
  max_active_calls: 50
rtp:
  jitter_window_ms: 60
  flush_interval_ms: 250
recording:
  out_dir: /srv/rec
  record_failed_calls: true
  file_mode: "0600"
  dir_mode: "0700"
consent:
  default:
    mode: all_party
retention:
  default:
    keep: 7y
logging:
  format: console
  level: debug
  drop_log_interval_s: 0
  stats_interval_s: 15
"""


def _schema_keys(cls: type, prefix: str) -> set[str]:
    out: set[str] = set()
    for f in dataclasses.fields(cls):
        if f.metadata.get("internal"):
            continue
        factory: object = f.default_factory
        if isinstance(factory, type) and dataclasses.is_dataclass(factory):
            out |= _schema_keys(factory, f"{prefix}{f.name}.")
        else:
            out.add(prefix + f.name)
    return out


def _document_keys(node: dict[str, object], prefix: str) -> set[str]:
    out: set[str] = set()
    for key, value in node.items():
        if isinstance(value, dict):
            out |= _document_keys(value, f"{prefix}{key}.")
        else:
            out.add(prefix + key)
    return out


def test_shipped_default_yaml_is_exactly_the_defaults() -> None:
    loaded = load_config(default_config_path())
    assert loaded.source == str(default_config_path())
    assert dataclasses.replace(loaded, source=Config().source) == Config()


def test_shipped_default_yaml_sets_every_key_explicitly() -> None:
    """A key missing from the documented defaults would silently stop being documented."""
    document = yaml.safe_load(default_config_path().read_text(encoding="utf-8"))
    assert _document_keys(document, "") == _schema_keys(Config, "")


def test_no_path_means_builtin_defaults() -> None:
    assert load_config(None) == Config()
    assert Config().source == "<defaults>"


def test_every_key_of_a_full_file_is_typed(tmp_path: Path) -> None:
    path = tmp_path / "callcap.yaml"
    path.write_text(FULL, encoding="utf-8")
    config = load_config(path)
    assert config.source == str(path)
    assert config.capture == CaptureConfig(
        sip_ports=(5060, 5080),
        detect_sip_any_port=False,
        interfaces=("eth0", "eth1"),
        promiscuous=True,
        rtp_port_range=(10000, 20000),
        snaplen=1500,
    )
    assert config.calls.inactivity_timeout_s == 90.0
    assert isinstance(config.calls.inactivity_timeout_s, float)
    assert config.calls.failed_linger_s == 2.5
    assert config.calls.max_active_calls == 50
    assert (config.rtp.jitter_window_ms, config.rtp.flush_interval_ms) == (60, 250)
    assert config.recording.out_dir == "/srv/rec"
    assert config.recording.record_failed_calls is True
    assert (config.recording.file_mode, config.recording.dir_mode) == (0o600, 0o700)
    assert config.consent.default == ConsentDefault(mode="all_party")
    assert config.retention.default.keep == Duration("7y", 7 * 365 * 86400)
    assert config.logging == LoggingConfig(
        format="console", level="debug", drop_log_interval_s=0.0, stats_interval_s=15.0
    )


def test_loaded_config_is_frozen() -> None:
    config = load_config_text(FULL)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.calls.max_active_calls = 1  # type: ignore[misc]


def test_partial_file_keeps_defaults_for_the_rest() -> None:
    config = load_config_text("rtp:\n  jitter_window_ms: 80\n", source="partial.yaml")
    assert config.rtp.jitter_window_ms == 80
    assert config.rtp.flush_interval_ms == 1000
    assert dataclasses.replace(config, rtp=Config().rtp, source="<defaults>") == Config()
    assert config.source == "partial.yaml"


@pytest.mark.parametrize(
    "text",
    ["", "\n\n", "# only a comment\n", "---\n", "~\n"],
    ids=["empty", "blank", "comment", "bare-document", "null"],
)
def test_empty_document_gives_defaults(text: str) -> None:
    assert load_config_text(text, source="x") == dataclasses.replace(Config(), source="x")


def test_empty_file_gives_defaults(tmp_path: Path) -> None:
    path = tmp_path / "empty.yaml"
    path.write_bytes(b"")
    assert load_config(path) == dataclasses.replace(Config(), source=str(path))


def test_empty_section_gives_its_defaults() -> None:
    """A section whose keys were all commented out is still a valid section."""
    config = load_config_text("capture:\n  # sip_ports: [5060]\ncalls:\n")
    assert config.capture == CaptureConfig()


@pytest.mark.parametrize(
    ("written", "mode"),
    [('"0640"', 0o640), ("'0755'", 0o755), ("0600", 0o600), ("0o644", 0o644), ('"600"', 0o600)],
)
def test_file_modes_are_read_as_octal(written: str, mode: int) -> None:
    config = load_config_text(f"recording:\n  file_mode: {written}\n")
    assert config.recording.file_mode == mode


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("0d", 0), ("45s", 45), ("30m", 1800), ("36h", 129600), ("90d", 7776000), ("2w", 1209600)],
)
def test_retention_durations_convert_to_seconds(text: str, seconds: int) -> None:
    keep = load_config_text(f"retention:\n  default:\n    keep: {text}\n").retention.default.keep
    assert keep == Duration(text, seconds)
    assert str(keep) == text


def test_rtp_port_range_null_means_all_udp() -> None:
    assert load_config_text("capture:\n  rtp_port_range: null\n").capture.rtp_port_range is None
    assert load_config_text("capture:\n  rtp_port_range:\n").capture.rtp_port_range is None


def test_numbers_follow_yaml_1_2_not_1_1_octal() -> None:
    """A port written with a leading zero is decimal, as YAML 1.2 and every human read it."""
    config = load_config_text("capture:\n  sip_ports: [05060, 0x13c4, 0o11704, 1_000]\n")
    assert config.capture.sip_ports == (5060, 5060, 5060, 1000)


def test_exponent_floats_are_numbers_although_yaml_1_1_says_string() -> None:
    config = load_config_text("calls:\n  inactivity_timeout_s: 1e3\n")
    assert config.calls.inactivity_timeout_s == 1000.0


def test_aliases_are_followed() -> None:
    config = load_config_text("capture:\n  sip_ports: &p [5070]\n  snaplen: 9000\n")
    assert config.capture.sip_ports == (5070,)


def test_byte_order_mark_is_accepted(tmp_path: Path) -> None:
    path = tmp_path / "bom.yaml"
    path.write_bytes(b"\xef\xbb\xbfcalls:\n  max_active_calls: 7\n")
    assert load_config(path).calls.max_active_calls == 7


# A schema extension shaped like the coming consent/retention rules: a tuple of dataclasses
# with a nested match mapping and a required key. The loader needs no change to handle it.


@dataclass(frozen=True, slots=True)
class _Match:
    from_user: str | None = None
    to_prefix: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class _Rule:
    name: str
    keep: Duration
    match: _Match = field(default_factory=_Match)
    priority: int = field(default=0, metadata={"check": (0, 100)})


@dataclass(frozen=True, slots=True)
class _Policy:
    rules: tuple[_Rule, ...] = ()


def test_lists_of_nested_dataclasses_load_without_loader_changes() -> None:
    text = """\
rules:
  - name: sales
    keep: 1y
    match:
      to_prefix: ["+4420", "+4430"]
  - name: ceo
    keep: 10y
    priority: 9
    match: {from_user: alice}
"""
    policy = convert(_Policy, text, "rules.yaml")
    assert policy == _Policy(
        rules=(
            _Rule("sales", Duration("1y", 365 * 86400), _Match(to_prefix=("+4420", "+4430"))),
            _Rule("ceo", Duration("10y", 3650 * 86400), _Match(from_user="alice"), priority=9),
        )
    )


def test_errors_inside_lists_of_dataclasses_name_index_and_line() -> None:
    text = "rules:\n  - name: a\n    keep: 1d\n  - name: b\n    keep: 1d\n    priority: 500\n"
    with pytest.raises(ConfigError) as info:
        convert(_Policy, text, "rules.yaml")
    assert str(info.value) == "rules.yaml:6: rules[1].priority: must be between 0 and 100, got 500"


def test_missing_required_key_in_a_list_item_is_reported() -> None:
    with pytest.raises(ConfigError) as info:
        convert(_Policy, "rules:\n  - name: a\n", "rules.yaml")
    assert str(info.value) == "rules.yaml:2: rules[0].keep: missing required key"
