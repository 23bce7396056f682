"""Output layout: safe, stable names from hostile input; directories with exact modes."""

from __future__ import annotations

import base64
import hashlib
import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from callcap.storage.layout import ensure_dir, make_call_uid, recording_stem, spool_dir

UID = re.compile(r"[a-z2-7]{16}")

# Any code point, surrogates included (header bytes arrive surrogate-escaped).
hostile_text = st.one_of(
    st.text(st.characters(exclude_categories=()), max_size=200),
    st.binary(max_size=200).map(lambda b: b.decode("utf-8", "surrogateescape")),
    st.sampled_from(["../../etc/passwd", "a/b\\c", "\x00", "", ".", "..", "x" * 10_000]),
)


@pytest.fixture
def umask() -> Iterator[None]:
    old = os.umask(0o077)  # the strictest common umask: modes must not depend on it
    try:
        yield
    finally:
        os.umask(old)


@given(hostile_text, st.one_of(st.none(), hostile_text), st.floats(0, 4e9))
def test_call_uid_is_16_base32_chars_whatever_the_headers(
    call_id: str, from_tag: str | None, start: float
) -> None:
    uid = make_call_uid(call_id, from_tag, start)
    assert UID.fullmatch(uid)
    assert make_call_uid(call_id, from_tag, start) == uid  # stable


def test_call_uid_depends_on_every_field() -> None:
    base = make_call_uid("a84b4c76e66710@pc33.atlanta.com", "1928301774", 1523308449.732)
    assert base == make_call_uid("a84b4c76e66710@pc33.atlanta.com", "1928301774", 1523308449.732)
    others = {
        make_call_uid("a84b4c76e66710@pc33.atlanta.co", "1928301774", 1523308449.732),
        make_call_uid("a84b4c76e66710@pc33.atlanta.com", "1928301775", 1523308449.732),
        make_call_uid("a84b4c76e66710@pc33.atlanta.com", None, 1523308449.732),
        make_call_uid("a84b4c76e66710@pc33.atlanta.com", "1928301774", 1523308449.733),
    }
    assert base not in others and len(others) == 4


def test_call_uid_fields_cannot_run_into_each_other() -> None:
    """NUL separators: ("ab", "c") and ("a", "bc") are different calls."""
    assert make_call_uid("ab", "c", 0.0) != make_call_uid("a", "bc", 0.0)


def test_call_uid_uses_whole_microseconds_of_the_start() -> None:
    assert make_call_uid("x", "t", 1.0000001) == make_call_uid("x", "t", 1.0000004)
    assert make_call_uid("x", "t", 1.000001) != make_call_uid("x", "t", 1.000002)


def test_undecodable_bytes_hash_as_the_bytes_themselves() -> None:
    """sha256 over Call-ID NUL From-tag NUL start-µs, first 80 bits in lower-case base32."""
    raw = b"\xff\xfe@host"
    digest = hashlib.sha256(raw + b"\x00tag\x00" + b"1500000000250000").digest()
    expected = base64.b32encode(digest[:10]).decode().lower()
    assert make_call_uid(raw.decode("utf-8", "surrogateescape"), "tag", 1500000000.25) == expected
    assert make_call_uid("\ud800", None, 0.0) != make_call_uid("\udcff", None, 0.0)


def test_recording_stem_is_the_utc_date_tree_and_time(tmp_path: Path) -> None:
    stem = recording_stem(tmp_path, 1523308449.732, "abcdefghijklmnop")
    assert stem == tmp_path / "2018" / "04" / "09" / "211409_abcdefghijklmnop"
    # Just before midnight UTC on New Year's Eve lands on that day, whatever the local zone.
    assert recording_stem(tmp_path, 1704067199.999, "u" * 16).relative_to(tmp_path) == Path(
        "2023/12/31/235959_uuuuuuuuuuuuuuuu"
    )


def test_spool_is_inside_the_output_directory(tmp_path: Path) -> None:
    assert spool_dir(tmp_path) == tmp_path / ".spool"
    assert os.stat(tmp_path).st_dev == os.stat(spool_dir(tmp_path).parent).st_dev


@pytest.mark.usefixtures("umask")
def test_ensure_dir_gives_every_created_level_the_mode(tmp_path: Path) -> None:
    os.chmod(tmp_path, 0o755)
    target = tmp_path / "2018" / "04" / "09"
    ensure_dir(target)
    for level in (tmp_path / "2018", tmp_path / "2018" / "04", target):
        assert level.stat().st_mode & 0o777 == 0o750
    assert tmp_path.stat().st_mode & 0o777 == 0o755  # existing levels untouched
    ensure_dir(target, 0o700)  # already there: nothing changes
    assert target.stat().st_mode & 0o777 == 0o750


def test_ensure_dir_ignores_a_permissive_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        ensure_dir(tmp_path / "a" / "b", 0o750)
    finally:
        os.umask(old)
    assert (tmp_path / "a").stat().st_mode & 0o777 == 0o750
    assert (tmp_path / "a" / "b").stat().st_mode & 0o777 == 0o750
