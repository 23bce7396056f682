"""Every config mistake is a ConfigError rendered ``FILE:LINE: key.path: problem``.

Line numbers are not hard-coded: each case marks the offending line with ``# <-`` and the
test counts where that line is, so editing a case cannot leave a stale expectation behind.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from callcap.config.loader import load_config, load_config_text
from callcap.errors import CallcapError, ConfigError

MARK = "# <-"


def _marked_line(text: str) -> int:
    lines = [n for n, line in enumerate(text.splitlines(), start=1) if MARK in line]
    assert len(lines) == 1, "each case marks exactly one line"
    return lines[0]


def _error(text: str, source: str = "callcap.yaml") -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_config_text(text, source=source)
    return info.value


CASES: list[tuple[str, str, str, str]] = [
    (
        "range",
        "calls:\n  max_active_calls: 5\nrtp:\n  flush_interval_ms: 500\n"
        "  jitter_window_ms: 10   # <-\n",
        "rtp.jitter_window_ms",
        "must be between 20 and 5000, got 10",
    ),
    (
        "unknown-key-with-suggestion",
        "# comment\ncapture:\n  sip_prots: [5060]   # <-\n",
        "capture.sip_prots",
        "unknown key (did you mean sip_ports?)",
    ),
    (
        "unknown-key-without-suggestion",
        "calls:\n  zzz: 1   # <-\n",
        "calls.zzz",
        "unknown key (expected one of: inactivity_timeout_s, failed_linger_s, max_active_calls, max_pending_calls)",
    ),
    (
        "unknown-section",
        "capture: {}\nrecordings:   # <-\n  out_dir: /x\n",
        "recordings",
        "unknown key (did you mean recording?)",
    ),
    (
        "string-for-number",
        "capture:\n  snaplen: 1500\ncalls:\n  max_active_calls: 3\n\n"
        "  inactivity_timeout_s: abc   # <-\n",
        "calls.inactivity_timeout_s",
        "expected a number, got string 'abc'",
    ),
    (
        "quoted-number-for-integer",
        "rtp:\n  jitter_window_ms: '200'   # <-\n",
        "rtp.jitter_window_ms",
        "expected an integer, got string '200'",
    ),
    (
        "float-for-integer",
        "calls:\n  max_active_calls: 2.5   # <-\n",
        "calls.max_active_calls",
        "expected an integer, got number 2.5",
    ),
    (
        "empty-value",
        "calls:\n  failed_linger_s:   # <-\n",
        "calls.failed_linger_s",
        "expected a number, got nothing",
    ),
    (
        "yes-is-not-a-boolean",
        "capture:\n  promiscuous: yes   # <-\n",
        "capture.promiscuous",
        "expected true or false, got 'yes'",
    ),
    (
        "number-for-boolean",
        "recording:\n  record_failed_calls: 1   # <-\n",
        "recording.record_failed_calls",
        "expected true or false, got integer 1",
    ),
    (
        "literal",
        "logging:\n  level: info\n  format: jsn   # <-\n",
        "logging.format",
        "must be one of 'json', 'console', got 'jsn' (did you mean json?)",
    ),
    (
        "consent-mode",
        "consent:\n  default:\n    mode: all_parties   # <-\n",
        "consent.default.mode",
        "must be one of 'one_party', 'all_party', got 'all_parties' (did you mean all_party?)",
    ),
    (
        "list-element-range",
        "capture:\n  sip_ports:\n    - 5060\n    - 70000   # <-\n",
        "capture.sip_ports[1]",
        "must be between 1 and 65535, got 70000",
    ),
    (
        "empty-port-list",
        "capture:\n  sip_ports: []   # <-\n",
        "capture.sip_ports",
        "must not be empty",
    ),
    (
        "scalar-for-list",
        "capture:\n  interfaces: eth0   # <-\n",
        "capture.interfaces",
        "expected a list, got string 'eth0'",
    ),
    (
        "number-in-string-list",
        "capture:\n  interfaces: [eth0, 1]   # <-\n",
        "capture.interfaces[1]",
        "expected a string, got integer 1 (quote it if it is meant as text)",
    ),
    (
        "port-range-length",
        "capture:\n  rtp_port_range: [1, 2, 3]   # <-\n",
        "capture.rtp_port_range",
        "expected a list of 2 items, got 3",
    ),
    (
        "port-range-order",
        "capture:\n  rtp_port_range: [20000, 10000]   # <-\n",
        "capture.rtp_port_range",
        "low port must not exceed high port, got [20000, 10000]",
    ),
    (
        "positive",
        "calls:\n  inactivity_timeout_s: 0   # <-\n",
        "calls.inactivity_timeout_s",
        "must be greater than 0, got 0",
    ),
    (
        "at-least",
        "calls:\n  max_active_calls: 0   # <-\n",
        "calls.max_active_calls",
        "must be at least 1, got 0",
    ),
    (
        "not-finite",
        "logging:\n  stats_interval_s: .inf   # <-\n",
        "logging.stats_interval_s",
        "must be a finite number, got .inf",
    ),
    (
        "snaplen",
        "capture:\n  snaplen: 63   # <-\n",
        "capture.snaplen",
        "must be between 64 and 262144, got 63",
    ),
    (
        "mode-not-octal",
        "recording:\n  file_mode: '0648'   # <-\n",
        "recording.file_mode",
        "expected an octal file mode like \"0640\", got string '0648'",
    ),
    (
        "duration-unit",
        "retention:\n  default:\n    keep: 90 days   # <-\n",
        "retention.default.keep",
        "expected a duration like 90d (a whole number and one of s, m, h, d, w, y), got '90 days'",
    ),
    (
        "duration-too-long",
        "retention:\n  default:\n    keep: 101y   # <-\n",
        "retention.default.keep",
        "must be at most 100y, got '101y'",
    ),
    (
        "duration-as-number",
        "retention:\n  default:\n    keep: 90   # <-\n",
        "retention.default.keep",
        "expected a duration like 90d, got integer 90",
    ),
    (
        "section-not-a-mapping",
        "capture: {}\nrtp: [1, 2]   # <-\n",
        "rtp",
        "expected a mapping, got a list",
    ),
    (
        "duplicate-key",
        "calls:\n  max_active_calls: 5\n  failed_linger_s: 1\n  max_active_calls: 6   # <-\n",
        "calls.max_active_calls",
        "duplicate key (first set on line 2)",
    ),
    (
        "duplicate-section",
        "rtp:\n  jitter_window_ms: 40\nlogging: {}\nrtp:   # <-\n  flush_interval_ms: 100\n",
        "rtp",
        "duplicate key (first set on line 1)",
    ),
    (
        "source-is-not-a-key",
        "source: other.yaml   # <-\n",
        "source",
        "unknown key (did you mean storage?)",  # the internal field is not offered
    ),
]


@pytest.mark.parametrize(
    ("text", "key", "problem"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_schema_violation_names_file_line_and_key(text: str, key: str, problem: str) -> None:
    line = _marked_line(text) if MARK in text else 1
    error = _error(text)
    assert str(error) == f"callcap.yaml:{line}: {key}: {problem}"
    assert (error.file, error.line, error.key, error.problem) == (
        "callcap.yaml",
        line,
        key,
        problem,
    )


def test_merge_keys_are_refused_rather_than_half_supported() -> None:
    text = "calls:\n  <<: {max_active_calls: 4}   # <-\n"
    assert str(_error(text)) == (
        f"callcap.yaml:{_marked_line(text)}: calls: merge keys (<<) are not supported; "
        "repeat the keys"
    )


def test_top_level_list_is_an_error_on_line_1() -> None:
    assert str(_error("- capture\n- calls\n")) == (
        "callcap.yaml:1: the top level must be a mapping of sections, got a list"
    )


def test_top_level_scalar_is_an_error_on_line_1() -> None:
    assert str(_error("just text\n")) == (
        "callcap.yaml:1: the top level must be a mapping of sections, got string 'just text'"
    )


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        (
            "calls:\n  max_active_calls: 5\n  failed_linger_s: [1, 2   # <-\n",
            "invalid YAML: expected ',' or ']', but got '<stream end>' "
            "(while parsing a flow sequence)",
        ),
        (
            "rtp:\n  jitter_window_ms: 40\n bad indent: 1   # <-\n",
            "invalid YAML: expected <block end>, but found '<block mapping start>' "
            "(while parsing a block mapping)",
        ),
        (
            "capture:\n  snaplen: *missing   # <-\n",
            "invalid YAML: found undefined alias 'missing'",
        ),
        (
            "capture: {}\n---   # <-\ncalls: {}\n",
            "invalid YAML: but found another document (expected a single document in the stream)",
        ),
        (
            "calls:\n\tmax_active_calls: 5   # <-\n",
            "invalid YAML: found character '\\t' that cannot start any token "
            "(while scanning for the next token)",
        ),
    ],
    ids=["unclosed-flow", "bad-indent", "undefined-alias", "two-documents", "tab"],
)
def test_yaml_syntax_error_names_its_line(text: str, problem: str) -> None:
    error = _error(text)
    line = _marked_line(text)
    if "unclosed" in problem or "stream end" in problem:
        line = len(text.splitlines()) + 1  # the parser notices at end of input
    assert str(error) == f"callcap.yaml:{line}: {problem}"
    assert error.key == ""


def test_control_character_is_reported_with_its_line() -> None:
    text = "calls:\n  max_active_calls: 5\n  failed_linger_s: 1\x07\n"
    assert str(_error(text)) == "callcap.yaml:3: invalid YAML: unacceptable character #x0007"


def test_invalid_utf8_file_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "latin1.yaml"
    path.write_bytes(b"recording:\n  out_dir: /srv/r\xe9c\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == f"{path}:2: not valid UTF-8 (byte 0xe9)"


def test_error_in_a_file_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "callcap.yaml"
    text = "capture:\n  detect_sip_any_port: true\n  snaplen: huge   # <-\n"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == (
        f"{path}:{_marked_line(text)}: capture.snaplen: expected an integer, got string 'huge'"
    )


def test_missing_file_is_a_config_error_naming_it(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == f"{path}: cannot read config file: No such file or directory"
    assert info.value.line is None


def test_directory_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path)
    assert str(info.value).startswith(f"{tmp_path}: cannot read config file: ")


def test_config_error_is_a_callcap_error() -> None:
    assert isinstance(_error("calls: 1\n"), CallcapError)


# --- property: nothing but ConfigError escapes, whatever the text --------------------------

_TOKENS = st.sampled_from(
    [
        "capture", "calls", "rtp", "recording", "consent", "retention", "logging", "default",
        "sip_ports", "snaplen", "interfaces", "rtp_port_range", "max_active_calls", "mode",
        "keep", "file_mode", "format", "level", "inactivity_timeout_s", "jitter_window_ms",
        ":", ": ", "\n", "\n  ", "\n    ", "- ", "[", "]", "{", "}", ", ", "'", '"', "#",
        "&a ", "*a", "!!int ", "!!str ", "!!bool ", "!!float ", "!!python/object:os.system ",
        "!x ", "yes", "true", "null", "~", "0640", "0o7", "0x1F", "1e3", "1e999", ".inf",
        ".nan", "-1", "5060", "99999999999999999999", "90d", "7y", "1:30", "2020-01-01",
        "---", "...", "<<", "? ", "|", ">", "\t", "%YAML 1.1\n", "\\", "\x00", "\x85",
        "\u2028", "\ufeff", "é",
    ]
)  # fmt: skip


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_TOKENS, max_size=40).map("".join))
def test_yaml_ish_token_soup_raises_only_config_error(text: str) -> None:
    with contextlib.suppress(ConfigError):
        load_config_text(text)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=200))
def test_arbitrary_text_raises_only_config_error(text: str) -> None:
    with contextlib.suppress(ConfigError):
        load_config_text(text)


_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
    st.lists(st.integers(), max_size=3),
)
_SECTIONS = {
    "capture": ["sip_ports", "detect_sip_any_port", "interfaces", "rtp_port_range", "snaplen"],
    "calls": ["inactivity_timeout_s", "failed_linger_s", "max_active_calls"],
    "rtp": ["jitter_window_ms", "flush_interval_ms"],
    "recording": ["out_dir", "file_mode", "dir_mode", "record_failed_calls"],
    "logging": ["format", "level", "drop_log_interval_s", "stats_interval_s"],
}


@st.composite
def _documents(draw: st.DrawFn) -> str:
    doc = {}
    for section in draw(st.lists(st.sampled_from(sorted(_SECTIONS)), max_size=4, unique=True)):
        keys = draw(st.lists(st.sampled_from(_SECTIONS[section]), max_size=4, unique=True))
        doc[section] = {key: draw(_SCALARS) for key in keys}
    return yaml.safe_dump(doc, default_flow_style=draw(st.booleans()))


@settings(max_examples=200, deadline=None)
@given(_documents())
def test_well_formed_documents_with_random_values_load_or_raise_config_error(text: str) -> None:
    with contextlib.suppress(ConfigError):
        load_config_text(text)


def test_deeply_nested_flow_collections_are_a_config_error() -> None:
    with pytest.raises(ConfigError):
        load_config_text("capture: " + "[" * 600 + "]" * 600 + "\n")
