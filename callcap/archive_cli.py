"""``callcap verify | hold | retention sweep | erase``: the archive's governance commands.

Each prints one line per recording it touched (``deleted 2026/01/02/030405_<uid> …``) so an
operator sees exactly what changed; the audit log records the same.  Exit codes: 0 done
(verify: clean), 1 verify found a mismatch / hold found no such recording / something could
not be done, 2 bad arguments or config.
"""

from __future__ import annotations

import argparse
import sys
from datetime import UTC, datetime
from pathlib import Path

from callcap.errors import ConfigError, StorageError
from callcap.storage.archive import Archive, Outcome

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_INPUT = 2


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    ver = sub.add_parser(
        "verify",
        help="check recordings and the audit log for tampering",
        description="Recompute every recording's hashes and the audit log's hash chain; "
        "report what was altered, added or removed. Exit 1 on any mismatch.",
    )
    ver.add_argument("dir", metavar="DIR", help="output directory")

    hold = sub.add_parser(
        "hold",
        help="place or lift a legal hold on a recording",
        description="A recording on legal hold is never deleted by the retention sweep or "
        "by erasure. The hold is written to the sidecar and logged.",
    )
    hold.add_argument("action", choices=("add", "remove"))
    hold.add_argument("call_uid", metavar="CALL_UID")
    hold.add_argument("--reason", required=True, metavar="TEXT", help="why (logged)")
    _out_args(hold)

    ret = sub.add_parser("retention", help="retention maintenance")
    ret_sub = ret.add_subparsers(dest="retention_command", required=True, metavar="COMMAND")
    sweep = ret_sub.add_parser(
        "sweep",
        help="delete expired recordings that are not on hold",
        description="Delete every recording whose sidecar's retention.delete_after has "
        "passed and that is not on legal hold: sidecar first, then audio.",
    )
    _out_args(sweep)
    sweep.add_argument("--dry-run", action="store_true", help="report, change nothing")
    sweep.add_argument(
        "--now", metavar="TIME", help="ISO 8601 time to sweep as of (default: now; UTC if no zone)"
    )

    erase = sub.add_parser(
        "erase",
        help="remove every recording of a party (right to erasure)",
        description="Remove every recording whose caller or callee user part or URI is "
        "exactly NUMBER_OR_URI, except those on legal hold.",
    )
    erase.add_argument("--party", required=True, metavar="NUMBER_OR_URI")
    _out_args(erase)
    erase.add_argument("--dry-run", action="store_true", help="report, change nothing")


def _out_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--out", metavar="DIR", help="output directory (default: recording.out_dir)"
    )
    parser.add_argument("--config", metavar="FILE", help="YAML config (default: built-in defaults)")


def run(args: argparse.Namespace) -> int:
    if args.command == "verify":
        return _verify(Path(args.dir))
    try:
        archive = _archive(args)
    except ConfigError as exc:
        _error(str(exc))
        return EXIT_INPUT
    try:
        if args.command == "hold":
            return _hold(archive, args)
        if args.command == "retention":
            return _sweep(archive, args)
        return _erase(archive, args)
    except StorageError as exc:
        _error(str(exc))
        return EXIT_FAILED


def _error(message: str) -> None:
    sys.stderr.write(f"callcap: error: {message}\n")
    sys.stderr.flush()


def _archive(args: argparse.Namespace) -> Archive:
    from callcap.config.loader import load_config

    config = load_config(args.config)
    out = Path(args.out or config.recording.out_dir)
    return Archive(out, file_mode=config.recording.file_mode, dir_mode=config.recording.dir_mode)


def _verify(out: Path) -> int:
    from callcap.storage.verify import verify

    if not out.is_dir():
        _error(f"{out} is not a directory")
        return EXIT_INPUT
    report = verify(out)
    for problem in report.problems:
        sys.stdout.write(f"{problem}\n")
    state = "clean" if report.clean else f"{len(report.problems)} problem(s)"
    sys.stdout.write(f"verified {report.files} file(s), {report.entries} audit entries: {state}\n")
    return EXIT_OK if report.clean else EXIT_FAILED


def _report(archive: Archive, outcomes: list[Outcome]) -> None:
    for outcome in outcomes:
        sys.stdout.write(outcome.line(archive.out_dir) + "\n")


def _hold(archive: Archive, args: argparse.Namespace) -> int:
    outcomes = archive.set_hold(args.call_uid, args.action == "add", args.reason)
    if not outcomes:
        _error(f"no recording with call_uid {args.call_uid} under {archive.out_dir}")
        return EXIT_FAILED
    _report(archive, outcomes)
    return EXIT_OK


def _sweep(archive: Archive, args: argparse.Namespace) -> int:
    try:
        now = _parse_now(args.now)
    except ValueError as exc:
        _error(f"--now: {exc}")
        return EXIT_INPUT
    outcomes = archive.sweep(now, dry_run=args.dry_run)
    _report(archive, outcomes)
    deleted = sum(o.action == "deleted" for o in outcomes)
    sys.stdout.write(f"swept as of {now.isoformat()}: {deleted} deleted\n")
    return EXIT_FAILED if any(o.action == "error" for o in outcomes) else EXIT_OK


def _erase(archive: Archive, args: argparse.Namespace) -> int:
    outcomes = archive.erase(args.party, dry_run=args.dry_run)
    _report(archive, outcomes)
    erased = sum(o.action == "erased" for o in outcomes)
    kept = sum(o.action == "kept" for o in outcomes)
    sys.stdout.write(f"{erased} erased, {kept} kept\n")
    return EXIT_FAILED if any(o.action == "error" for o in outcomes) else EXIT_OK


def _parse_now(text: str | None) -> datetime:
    if text is None:
        return datetime.now(UTC)
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(
            f"expected an ISO 8601 time like 2026-01-02T03:04:05Z, got {text!r}"
        ) from None
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)
