"""The sidecar contract: its JSON Schema, validation messages, and safe header text."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from callcap.errors import StorageError
from callcap.storage.sidecar import (
    SCHEMA_VERSION,
    clean_text,
    iso_utc,
    load_schema,
    validate_sidecar,
)


def _example() -> dict[str, Any]:
    """A complete sidecar: an answered PCMA call with RFC 4733 DTMF and some loss."""
    return {
        "schema_version": 1,
        "call_uid": "k7vq2x4mzs3tjd5a",
        "call_id": "12013223@200.57.7.195",
        "from": {
            "uri": "sip:200.57.7.195:55061;user=phone",
            "user": None,
            "display_name": "Ivan Alvarez",
            "tag": "GR52RWG346-34",
        },
        "to": {
            "uri": "sip:francisco@bestel.com:55060",
            "user": "francisco",
            "display_name": None,
            "tag": "298852044",
        },
        "caller_ip": "200.57.7.195",
        "callee_ip": "2001:db8::7",
        "start": "2018-04-09T21:14:09.732Z",
        "answer": "2018-04-09T21:14:12.001Z",
        "end": "2018-04-09T21:15:01.250Z",
        "duration_s": 51.518,
        "talk_s": 49.249,
        "end_reason": "bye_caller",
        "final_status": 200,
        "transport": "udp",
        "user_agents": [
            {"side": "caller", "value": "Ekiga/2.0.2"},
            {"side": "callee", "value": "Asterisk PBX"},
        ],
        "audio": {
            "file": "211409_k7vq2x4mzs3tjd5a.wav",
            "format": "WAV",
            "encoding": "PCM_16",
            "sample_rate": 8000,
            "channels": ["caller", "callee"],
            "frames": 394000,
            "duration_s": 49.25,
            "start": "2018-04-09T21:14:12.020Z",
            "sha256": "0" * 63 + "f",
            "bytes": 1576112,
        },
        "streams": [
            {
                "side": "caller",
                "src": "200.57.7.195:40376",
                "dst": "[2001:db8::7]:8000",
                "ssrc": "0x5711BF84",
                "payload_type": 8,
                "payload_types": {"8": 631, "96": 35},
                "codec": "PCMA",
                "decoded": True,
                "encrypted": False,
                "packets": 666,
                "lost": 2,
                "duplicates": 0,
                "reordered": 1,
                "late": 0,
                "jitter_ms": 3.25,
                "jitter_mean_ms": 1.1,
                "first": "2018-04-09T21:14:12.020Z",
                "last": "2018-04-09T21:15:01.240Z",
            }
        ],
        "gaps": [{"side": "caller", "from_s": 12.34, "to_s": 12.38}],
        "gaps_omitted": 0,
        "dtmf": [
            {"digit": "6", "side": "caller", "source": "rfc4733", "at_s": 3.5, "duration_ms": 120},
            {
                "digit": "#",
                "side": "callee",
                "source": "sip_info",
                "at_s": None,
                "duration_ms": None,
            },
        ],
        "consent": {
            "mode": "all_party",
            "rule": "eu-desk",
            "status": "granted",
            "evidence": {"method": "dtmf", "digit": "1", "side": "callee", "at_s": 8.2},
            "action": "kept",
        },
        "retention": {
            "rule": "default",
            "keep": "90d",
            "delete_after": "2018-07-08T21:14:09.732Z",
            "legal_hold": False,
        },
        "warnings": [{"code": "rtp_loss", "detail": "2 packets lost on the caller stream"}],
        "recorder": {"name": "callcap", "version": "0.1.0"},
    }


def test_full_example_validates() -> None:
    validate_sidecar(_example())


def test_minimal_failed_call_validates() -> None:
    doc = _example()
    doc.update(
        answer=None,
        talk_s=None,
        end_reason="rejected_486",
        final_status=486,
        audio=None,
        streams=[],
        gaps=[],
        dtmf=[],
        warnings=[],
    )
    doc["consent"].update(mode="one_party", rule=None, status="not_required", evidence=None)
    validate_sidecar(doc)


def test_schema_is_draft_2020_12_with_the_published_id() -> None:
    from jsonschema import Draft202012Validator

    schema = load_schema()
    Draft202012Validator.check_schema(schema)
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert schema["$id"] == "https://callcap.invalid/schema/sidecar-1.json"
    assert schema["properties"]["schema_version"] == {"const": SCHEMA_VERSION}
    assert load_schema() is not load_schema()  # callers may mutate their copy


def test_every_object_in_the_schema_is_closed() -> None:
    """``additionalProperties: false`` wherever named properties are declared."""
    open_objects: list[str] = []

    def walk(node: Any, where: str) -> None:
        if isinstance(node, dict):
            if "properties" in node and node.get("additionalProperties") is not False:
                open_objects.append(where)
            for key, value in node.items():
                walk(value, f"{where}/{key}")
        elif isinstance(node, list):
            for i, value in enumerate(node):
                walk(value, f"{where}/{i}")

    walk(load_schema(), "#")
    assert open_objects == []


def _errors_for(doc: dict[str, Any]) -> str:
    with pytest.raises(StorageError) as info:
        validate_sidecar(doc)
    return str(info.value)


def test_missing_key_is_named() -> None:
    doc = _example()
    del doc["retention"]["legal_hold"]
    assert "$.retention: 'legal_hold' is a required property" in _errors_for(doc)


def test_extra_key_is_rejected_at_any_depth() -> None:
    doc = _example()
    doc["streams"][0]["mos"] = 4.1
    assert "$.streams[0]: Additional properties are not allowed ('mos'" in _errors_for(doc)
    doc = _example()
    doc["surprise"] = True
    assert "$: Additional properties are not allowed ('surprise'" in _errors_for(doc)


def test_bad_enum_is_named() -> None:
    doc = _example()
    doc["dtmf"][0]["source"] = "guess"
    assert "$.dtmf[0].source: 'guess' is not one of" in _errors_for(doc)
    doc = _example()
    doc["end_reason"] = "rejected_200"
    assert "$.end_reason:" in _errors_for(doc)


def test_bad_time_format_is_named() -> None:
    doc = _example()
    doc["start"] = "2018-04-09 21:14:09"
    doc["streams"][0]["last"] = "2018-04-09T21:15:01Z"  # no milliseconds
    message = _errors_for(doc)
    assert "$.start: '2018-04-09 21:14:09' does not match" in message
    assert "$.streams[0].last: '2018-04-09T21:15:01Z' does not match" in message


def test_bad_call_uid_is_named() -> None:
    for uid in ("K7VQ2X4MZS3TJD5A", "k7vq2x4mzs3tjd5", "../../etc/passwd", "k7vq2x4mzs3tjd51"):
        doc = _example()
        doc["call_uid"] = uid
        assert "$.call_uid:" in _errors_for(doc)


def test_every_error_is_listed_not_just_the_first() -> None:
    doc = _example()
    doc["schema_version"] = 2
    doc["caller_ip"] = "not-an-ip"
    doc["audio"]["file"] = "../x.wav"
    doc["streams"][0]["ssrc"] = "0x5711bf84"
    message = _errors_for(doc)
    for path in ("$.schema_version:", "$.caller_ip:", "$.audio:", "$.streams[0].ssrc:"):
        assert path in message


def test_iso_utc_has_milliseconds_and_z() -> None:
    assert iso_utc(1523308449.732) == "2018-04-09T21:14:09.732Z"
    assert iso_utc(0) == "1970-01-01T00:00:00.000Z"
    assert iso_utc(1523308449.9999) == "2018-04-09T21:14:09.999Z"  # truncated, not rounded up
    assert iso_utc(1.0199999999) == "1970-01-01T00:00:01.020Z"  # float noise does not cost a ms


def test_clean_text_escapes_what_is_not_printable() -> None:
    raw = b"Alice\x00\r\n\xff\xfe \xe2\x80\xae\\x41 \xc3\xa9".decode("utf-8", "surrogateescape")
    assert clean_text(raw) == "Alice\\u0000\\u000d\\u000a\\xff\\xfe \\u202e\\\\x41 é"
    assert clean_text("plain ascii; tag=1928301774") == "plain ascii; tag=1928301774"
    assert clean_text(None) is None
    assert clean_text("\U000e0001") == "\\U000e0001"  # language tag: a format character


def test_clean_text_marks_how_much_was_cut() -> None:
    assert clean_text("a" * 600, limit=512) == "a" * 512 + "…[+88]"
    assert clean_text("\x00" * 10, limit=12) == "\\u0000\\u0000…[+48]"  # limit counts output


hostile = st.one_of(
    st.text(st.characters(exclude_categories=()), max_size=300),
    st.binary(max_size=300).map(lambda b: b.decode("utf-8", "surrogateescape")),
)


@given(hostile, st.integers(1, 600))
def test_clean_text_output_is_always_bounded_valid_utf8(value: str, limit: int) -> None:
    out = clean_text(value, limit)
    assert out is not None
    out.encode("utf-8")  # strict: no surrogate survives
    assert out.isprintable()
    body, _, cut = out.partition("…[+")
    if cut:
        assert len(body) == limit and cut.endswith("]") and int(cut[:-1]) > 0
    else:
        assert len(out) <= limit
    assert json.loads(json.dumps(out, ensure_ascii=False)) == out


@given(st.text(st.characters(exclude_categories=("Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"))))
def test_clean_text_leaves_ordinary_text_alone(value: str) -> None:
    if value.isprintable() and "\\" not in value:
        assert clean_text(value, limit=10_000) == value


def test_validation_does_not_modify_the_document() -> None:
    doc = _example()
    before = copy.deepcopy(doc)
    validate_sidecar(doc)
    assert doc == before
