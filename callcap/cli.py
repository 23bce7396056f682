"""Command-line entry points: ``callcap record``, ``daemon`` and ``schema``; the archive's
``verify``, ``hold``, ``retention sweep`` and ``erase`` live in :mod:`callcap.archive_cli`.

Exit codes: 0 success; 2 a capture or the config could not be read (the other captures are
still processed, and the error is one line on stderr naming the file).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from callcap import __version__, archive_cli
from callcap.errors import ConfigError, StorageError

# The recorder runs on one thread; its matrix products (the in-band DTMF detector's) are
# small, and a BLAS thread pool contending for the cores with the capture loop makes them
# several times slower, not faster (bench/README.md).  Set before numpy is first imported.
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_INPUT = 2
EXIT_BUSY = 4  # the output directory is held by another running recorder

_M_TRIM_THRESHOLD = -1  # glibc mallopt(3) parameters
_M_MMAP_THRESHOLD = -3


def _keep_freed_memory() -> bool:
    """Let glibc's allocator keep freed blocks of up to 32 MiB for reuse (True if it could).

    Once a second the pipeline builds arrays of a few MiB per operation — every call's
    payloads, decoded audio, header fields — and drops them.  By default glibc serves blocks
    that size with ``mmap`` and gives them back at once, so every second starts with tens of
    thousands of page faults on fresh zeroed pages: a third of a busy recorder's system time
    (bench/README.md).  With the thresholds raised they come from the heap and are reused;
    peak memory barely moves, since the same arrays are needed either way.  Elsewhere than
    glibc this does nothing.
    """
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, 32 << 20)) and bool(
        mallopt(_M_TRIM_THRESHOLD, 128 << 20)
    )


def _raise_open_files() -> None:
    """Every call in flight keeps its spool audio and its two checkpoint files open: raise
    the soft limit of open files to the hard one (systemd gives services a soft limit of
    1024 and a hard limit far above it; the unit asks for more), so that thousands of
    concurrent calls never meet EMFILE."""
    import resource

    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard == resource.RLIM_INFINITY or hard > soft:
            target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError):  # pragma: no cover - a limit we may not raise: keep it
        pass


def _workers(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if not 1 <= value <= 64:
        raise argparse.ArgumentTypeError(f"must be a whole number from 1 to 64, got {text!r}")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="callcap", description="Passive SIP/RTP call recorder.")
    parser.add_argument("--version", action="version", version=f"callcap {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    rec = sub.add_parser(
        "record",
        help="record every call in capture files (pcap/pcapng)",
        description="Write one stereo WAV (caller left, callee right) and one JSON sidecar per "
        "answered call found in the captures, under OUT/YYYY/MM/DD/.",
    )
    rec.add_argument(
        "captures", nargs="+", metavar="CAPTURE", help="pcap or pcapng file(s), read in order"
    )
    rec.add_argument("--out", required=True, metavar="DIR", help="output directory")
    rec.add_argument("--config", metavar="FILE", help="YAML config (default: built-in defaults)")
    rec.add_argument(
        "--log-format", choices=("json", "console"), help="log rendering (default: config)"
    )
    rec.add_argument(
        "--log-level", choices=("debug", "info", "warning", "error"), help="minimum log level"
    )
    rec.add_argument(
        "--workers",
        type=_workers,
        default=1,
        metavar="N",
        help="record on N cores: N processes, each recording its share of the calls (default 1)",
    )

    dmn = sub.add_parser(
        "daemon",
        help="record live calls from network interfaces",
        description="Sniff SIP and RTP on the configured interfaces and record every call. "
        "SIGTERM/SIGINT finish calls in flight and exit; SIGHUP reloads the config.",
    )
    dmn.add_argument(
        "--config",
        metavar="FILE",
        help="YAML config (default: /etc/callcap/callcap.yaml if present)",
    )
    dmn.add_argument(
        "--interface",
        action="append",
        default=[],
        metavar="IFACE",
        help="interface to sniff (repeatable)",
    )
    dmn.add_argument("--out", metavar="DIR", help="output directory (overrides recording.out_dir)")
    dmn.add_argument(
        "--log-format", choices=("json", "console"), help="log rendering (default: config)"
    )
    dmn.add_argument(
        "--pcap", metavar="FILE", help="replay a capture file through the live path, then exit"
    )
    dmn.add_argument(
        "--workers",
        type=_workers,
        metavar="N",
        help="recording processes (overrides capture.workers)",
    )

    sub.add_parser("schema", help="print the JSON Schema of the per-call sidecar")
    archive_cli.add_parsers(sub)
    for name, what in (("pause", "pause"), ("resume", "resume")):
        ctl = sub.add_parser(
            name,
            help=f"{what} the recording of a call in progress (PCI)",
            description=f"Ask the running daemon, over its control socket, to {what} the "
            "recording of one call. Exit 1 if the daemon cannot be reached or has no such call.",
        )
        ctl.add_argument("--call-id", required=True, metavar="ID", help="the call's SIP Call-ID")
        ctl.add_argument("--config", metavar="FILE", help="YAML config naming control.socket")
        ctl.add_argument("--socket", metavar="PATH", help="control socket (overrides the config)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "schema":
        return _schema()
    if args.command in ("record", "daemon"):
        _keep_freed_memory()
        _raise_open_files()
    if args.command == "record":
        return _record(args)
    if args.command == "daemon":
        return _daemon(args)
    if args.command in ("verify", "hold", "retention", "erase"):
        return archive_cli.run(args)
    if args.command in ("pause", "resume"):
        return _control(args)
    return EXIT_INPUT  # pragma: no cover - argparse enforces the choices


def _schema() -> int:
    from callcap.storage.sidecar import load_schema

    sys.stdout.write(json.dumps(load_schema(), indent=2, ensure_ascii=False) + "\n")
    return EXIT_OK


SYSTEM_CONFIG = "/etc/callcap/callcap.yaml"


def _daemon(args: argparse.Namespace) -> int:
    from callcap.daemon import Daemon

    config = args.config
    if config is None and os.path.exists(SYSTEM_CONFIG):
        config = SYSTEM_CONFIG
    daemon = Daemon(
        config,
        interfaces=args.interface,
        out=args.out,
        log_format=args.log_format,
        pcap=args.pcap,
        workers=args.workers,
    )
    return daemon.run()


def _control(args: argparse.Namespace) -> int:
    from callcap.config.loader import load_config
    from callcap.control import ControlError, request

    path = args.socket
    if path is None:
        config_path = args.config
        if config_path is None and os.path.exists(SYSTEM_CONFIG):
            config_path = SYSTEM_CONFIG
        try:
            path = load_config(config_path).control.socket
        except ConfigError as exc:
            _error(str(exc))
            return EXIT_INPUT
        if path is None:
            _error("control.socket is disabled in the config")
            return EXIT_FAILED
    try:
        reply = request(path, args.command, args.call_id)
    except ControlError as exc:
        _error(str(exc))
        return EXIT_FAILED
    sys.stdout.write(json.dumps(reply) + "\n")
    if not reply.get("ok"):
        _error(str(reply.get("error", "the daemon refused the request")))
        return EXIT_FAILED
    return EXIT_OK


def _error(message: str) -> None:
    sys.stderr.write(f"callcap: error: {message}\n")
    sys.stderr.flush()


def _record(args: argparse.Namespace) -> int:
    from callcap.config.loader import load_config
    from callcap.logs import configure_logging
    from callcap.record import RecordJob, record
    from callcap.storage.layout import ensure_dir
    from callcap.storage.lock import OutputInUse, OutputLock

    try:
        config = load_config(args.config)
    except ConfigError as exc:
        _error(str(exc))
        return EXIT_INPUT
    configure_logging(
        args.log_format or config.logging.format,
        args.log_level or config.logging.level,
        stream=sys.stderr,
    )
    out = Path(args.out)
    try:
        ensure_dir(out, config.recording.dir_mode)
    except OSError as exc:
        _error(f"cannot create output directory {out}: {exc.strerror or exc}")
        return EXIT_INPUT
    try:
        lock = OutputLock(out)
    except OutputInUse as exc:
        _error(str(exc))
        return EXIT_BUSY
    except StorageError as exc:
        _error(str(exc))
        return EXIT_INPUT
    with lock:  # forked recording workers share it
        return record(RecordJob(config, tuple(args.captures), out), args.workers)
