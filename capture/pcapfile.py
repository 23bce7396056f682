"""Capture files in, ``(timestamp, linktype, frame)`` out: classic pcap, pcapng, either gzipped.

Classic pcap is read by code of our own, because it is the format of nearly every capture a
recorder replays and a generic reader costs several times more per packet (scapy's
``RawPcapReader`` ≈ 0.3–0.5 M packets/s): a few MiB at a time, the records of each read
found by :func:`_walk_records` and handed over as one :class:`FrameBlock` (≈ 3 M
packets/s on the development machine), or frame by frame.  pcapng, with its per-interface
link types and timestamp resolutions, is delegated to scapy's ``RawPcapNgReader``, slightly
extended (see :class:`_NgReader`).

A capture cut short (a tcpdump killed mid-write, a copy of a file still being written) is
normal on a recorder's input: every complete record before the cut is yielded, the partial
one is not, and :attr:`CaptureReader.truncated` says so — never an exception.
"""

from __future__ import annotations

import gzip
import logging
import os
import struct
import zlib
from collections.abc import Generator, Iterator
from types import TracebackType
from typing import IO, TYPE_CHECKING, Any, Final, cast

import numpy as np
import numpy.typing as npt

from callcap.capture.block import FrameBlock, batched, values_at
from callcap.errors import CaptureError

if TYPE_CHECKING:
    from typing import Self

# libpcap's MAXIMUM_SNAPLEN: no capture tool writes a record larger than this, so a record
# header claiming more is corruption.  There is no way to resynchronise on the next record
# (records carry no marker), so reading stops there with ``truncated`` set.
MAX_RECORD = 262_144
# Bytes per read when reading blocks (~5 k RTP frames).  Not more: under the daemon's and
# record's malloc thresholds (callcap.cli) these buffers come from the heap, and with 4 MiB
# ones a ten-hour call's peak RSS crept up by 4 MiB steps (78 MB at 10 min, 88 MB at
# 10.5 h); with 1 MiB it is 56 and 60 MB, for the same CPU.
_BLOCK_READ = 1 << 20
_PROBE_MAX = 4096  # records of one size checked by one array comparison
_PROBE_MIN = 8  # below this the walk goes record by record

_GZIP_MAGIC: Final = b"\x1f\x8b"
_PCAPNG_MAGIC: Final = b"\x0a\x0d\x0d\x0a"

# Classic pcap magics (draft-ietf-opsawg-pcap §4): byte order and timestamp resolution.
# The 0xa1b2cd34 "modified" (Kuznetzov) format adds 8 bytes to every record header.
_PCAP_MAGICS: Final[dict[bytes, tuple[str, float, int]]] = {
    b"\xd4\xc3\xb2\xa1": ("<", 1e6, 16),
    b"\xa1\xb2\xc3\xd4": (">", 1e6, 16),
    b"\x4d\x3c\xb2\xa1": ("<", 1e9, 16),
    b"\xa1\xb2\x3c\x4d": (">", 1e9, 16),
    b"\x34\xcd\xb2\xa1": ("<", 1e6, 24),
    b"\xa1\xb2\xcd\x34": (">", 1e6, 24),
}
_GLOBAL_HEADER = {"<": struct.Struct("<HHiIII"), ">": struct.Struct(">HHiIII")}
# The top four bits of the link-type field carry FCS information (draft-ietf-opsawg-pcap §4).
_LINKTYPE_MASK: Final = 0x0FFFFFFF

Frame = tuple[float, int, bytes]


class CaptureReader:
    """An opened capture file; iterate it once for ``(ts, linktype, frame)``.

    ``ts`` is seconds since the epoch (UTC) as a float, ``linktype`` the DLT/LINKTYPE number
    of the frame's interface (pcapng files may mix several).  ``packets`` counts the records
    yielded; it is brought up to date when iteration ends — exhausted, broken off, or the
    reader closed — rather than on every record, which would cost ~10 % of the read rate.
    ``linktype`` (attribute) is the file's link type for classic pcap, None for pcapng.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        self.truncated = False
        self.packets = 0
        self.format = ""
        self.linktype: int | None = None
        self._layout: tuple[str, float, int] = ("<", 1e6, 16)
        self._file: IO[bytes] | None = None
        self._raw: IO[bytes] | None = None
        self._ng: Any = None
        self._started = False
        try:
            raw: IO[bytes] = open(self.path, "rb")  # noqa: SIM115 - closed by close()
        except OSError as exc:
            raise CaptureError(f"{self.path}: {exc.strerror or exc}") from exc
        self._raw = raw
        try:
            self._open(raw)
        except BaseException:
            self.close()
            raise

    def _open(self, raw: IO[bytes]) -> None:
        f: IO[bytes] = raw
        try:
            magic = raw.read(4)
            if magic[:2] == _GZIP_MAGIC:
                raw.seek(0)
                f = cast("IO[bytes]", gzip.GzipFile(fileobj=raw, mode="rb"))
                magic = f.read(4)
        except (OSError, EOFError, zlib.error) as exc:
            raise CaptureError(f"{self.path}: unreadable: {exc}") from exc
        self._file = f
        if not magic:
            raise CaptureError(f"{self.path}: empty file")
        if magic == _PCAPNG_MAGIC:
            self.format = "pcapng"
            self._ng = _open_pcapng(self.path, f, magic)
            return
        layout = _PCAP_MAGICS.get(magic)
        if layout is None:
            raise CaptureError(f"{self.path}: not a pcap or pcapng capture (magic {magic.hex()})")
        self.format = "pcap"
        order, _div, _reclen = layout
        try:
            header = f.read(_GLOBAL_HEADER[order].size)
        except (OSError, EOFError, zlib.error) as exc:
            raise CaptureError(f"{self.path}: unreadable: {exc}") from exc
        if len(header) < _GLOBAL_HEADER[order].size:
            raise CaptureError(f"{self.path}: pcap global header cut short")
        _major, _minor, _zone, _sigfigs, _snaplen, linktype = _GLOBAL_HEADER[order].unpack(header)
        self._layout = layout
        self.linktype = linktype & _LINKTYPE_MASK

    def __iter__(self) -> Iterator[Frame]:
        f = self._start()
        if self._ng is not None:
            return self._iter_pcapng(self._ng)
        return self._iter_pcap(f)

    def _start(self) -> IO[bytes]:
        """The file, for the one pass a reader makes over it."""
        if self._started:
            raise CaptureError(f"{self.path}: a capture reader can be iterated only once")
        self._started = True
        if self._file is None:
            raise CaptureError(f"{self.path}: reader is closed")
        return self._file

    def blocks(self) -> Iterator[FrameBlock]:
        """The capture as :class:`FrameBlock` s, in order (instead of iterating the reader).

        Classic pcap blocks are the file's own bytes, read a few MiB at a time, with the
        records found by :func:`_walk_records`; pcapng frames are batched.
        """
        f = self._start()
        if self._ng is not None:
            return batched(self._iter_pcapng(self._ng))
        return self._blocks_pcap(f)

    def _blocks_pcap(self, f: IO[bytes]) -> Generator[FrameBlock, None, None]:
        order, div, reclen = self._layout
        header = order + "u4"
        linktype = self.linktype or 0
        read = f.read
        n = 0
        buf = b""
        pos = 0
        probe = _PROBE_MIN
        try:
            while True:
                more = read(_BLOCK_READ)
                if not more:
                    self.truncated = pos < len(buf)  # a record cut short by the end of file
                    return
                buf = buf[pos:] + more if pos < len(buf) else more
                starts, pos, probe, bad = _walk_records(buf, order, reclen, probe)
                if len(starts):
                    # the record headers' seconds, fraction and captured length
                    seconds = values_at(buf, starts, header)
                    fraction = values_at(buf, starts + 4, header)
                    n += len(starts)
                    yield FrameBlock(
                        data=buf,
                        starts=starts + reclen,
                        lengths=values_at(buf, starts + 8, header).astype(np.int64),
                        times=seconds + fraction / div,
                        linktypes=np.full(len(starts), linktype, dtype=np.int64),
                    )
                if bad:
                    self.truncated = True
                    return
        except (EOFError, zlib.error):
            self.truncated = True
        except OSError as exc:
            raise CaptureError(f"{self.path}: read failed: {exc}") from exc
        finally:
            self.packets = n

    def _iter_pcap(self, f: IO[bytes]) -> Iterator[Frame]:
        """The frames of :meth:`_blocks_pcap`, one by one (``packets`` counts those taken)."""
        n = 0
        blocks = self._blocks_pcap(f)
        try:
            for block in blocks:
                for frame in block.frames():
                    n += 1
                    yield frame
        finally:
            blocks.close()
            self.packets = n

    def _iter_pcapng(self, ng: Any) -> Iterator[Frame]:
        from scapy.error import Scapy_Exception

        n = 0
        try:
            for frame in ng.frames():
                n += 1
                yield frame
        except _CleanEndError:
            pass
        except EOFError:
            self.truncated = True
        except (Scapy_Exception, struct.error, ValueError, zlib.error):
            self.truncated = True
        except OSError as exc:
            raise CaptureError(f"{self.path}: read failed: {exc}") from exc
        finally:
            self.packets = n

    def close(self) -> None:
        """Close the file; safe to call twice."""
        for f in (self._file, self._raw):
            if f is not None:
                f.close()
        self._file = self._raw = None
        self._ng = None

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _walk_records(
    buf: bytes, order: str, reclen: int, probe: int
) -> tuple[npt.NDArray[np.int64], int, int, bool]:
    """Offsets of the complete classic-pcap records at the start of ``buf``.

    Records carry no index: each one's place follows from the length of the one before.  A
    stream of RTP is mostly frames of one size, though, so after a record of ``L`` captured
    bytes the walk *guesses* that the next ``probe`` records are ``L`` bytes too and checks
    all their length fields with one strided array comparison; the first that differs is
    where the guess ends (every record before it is then known to be where the guess put
    it).  ``probe`` grows while guesses hold and shrinks when they fail; below
    :data:`_PROBE_MIN` the walk steps record by record, as a plain reader would.

    Returns the offsets, the offset of the first incomplete record, the probe size to go on
    with, and whether a record header claims more than :data:`MAX_RECORD` bytes (corruption:
    the walk stops before it).
    """
    caplen_of = struct.Struct(order + "I").unpack_from
    length = np.dtype(order + "u4")
    end = len(buf)
    pos = 0
    runs: list[npt.NDArray[np.int64]] = []
    singles: list[int] = []
    streak = 0
    previous = -1
    while pos + reclen <= end:
        caplen = caplen_of(buf, pos + 8)[0]
        if caplen > MAX_RECORD:
            return _offsets(runs, singles), pos, probe, True
        step = reclen + caplen
        if pos + step > end:
            break  # the record goes on in the next read
        if probe < _PROBE_MIN:
            singles.append(pos)
            pos += step
            streak = streak + 1 if caplen == previous else 0
            previous = caplen
            if streak >= _PROBE_MIN:
                probe = _PROBE_MIN  # a run of one size: back to probing
            continue
        k = min(probe, (end - pos) // step)
        if k > 1:
            lengths = np.ndarray((k,), dtype=length, buffer=buf, offset=pos + 8, strides=(step,))
            same = lengths == caplen
            m = k if bool(same.all()) else int(same.argmin())
        else:
            m = 1
        if singles:
            runs.append(np.array(singles, dtype=np.int64))
            singles = []
        runs.append(pos + step * np.arange(m, dtype=np.int64))
        pos += m * step
        if m == k:
            probe = min(2 * probe, _PROBE_MAX)
        else:
            probe = 2 * m
            streak = 0
            previous = -1
    return _offsets(runs, singles), pos, probe, False


def _offsets(runs: list[npt.NDArray[np.int64]], singles: list[int]) -> npt.NDArray[np.int64]:
    if singles:
        runs.append(np.array(singles, dtype=np.int64))
    if not runs:
        return np.zeros(0, dtype=np.int64)
    return runs[0] if len(runs) == 1 else np.concatenate(runs)


# --- pcapng via scapy --------------------------------------------------------------------------


class _CleanEndError(EOFError):
    """The file ended exactly at a block boundary (scapy reports every end as EOFError)."""


# RawPcapNgReader methods whose warnings describe damage we report as ``truncated``.
_NG_READ_METHODS = frozenset(
    {
        "__init__",
        "_read_block",
        "_read_block_tail",
        "_read_block_shb",
        "_read_options",
        "_read_block_idb",
        "_check_interface_id",
        "_read_block_epb",
        "_read_block_spb",
        "_read_block_pkt",
        "_read_block_dsb",
        "_read_block_pib",
        "_read_packet",
    }
)


class _QuietPcapNg(logging.Filter):
    """Keeps scapy's pcapng reader from printing: damage is reported by ``truncated``."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (
            record.funcName in _NG_READ_METHODS
            and record.pathname.endswith(os.path.join("scapy", "utils.py"))
        )


_SHB_TYPE: Final = b"\x0a\x0d\x0d\x0a"  # a palindrome: the same in either byte order
_EPB_TYPE: Final = 6
# A block bigger than the largest record plus generous room for options is corruption.
_MAX_BLOCK: Final = MAX_RECORD + 65536
_ng_class: Any = None


def _pcapng_reader_class() -> Any:
    """Build (once) the scapy subclass; scapy is imported only when a pcapng file turns up."""
    global _ng_class  # noqa: PLW0603 - lazily built singleton, avoids importing scapy early
    if _ng_class is not None:
        return _ng_class
    from scapy.utils import RawPcapNgReader

    logging.getLogger("scapy.runtime").addFilter(_QuietPcapNg())

    class _NgReader(RawPcapNgReader):  # type: ignore[misc,unused-ignore]  # untyped base
        """scapy's pcapng reader, with a block loop of our own in :meth:`frames`.

        scapy parses the Section Header, Interface Description (link type, ``if_tsresol``)
        and the rarer packet blocks.  The loop adds what it lacks for a recorder:

        * Enhanced Packet Blocks — nearly every block of a capture — are decoded inline,
          which reads ~3.5× faster than scapy's generic path (0.19 → 0.66 M packets/s);
        * a clean end of file is told apart from a block cut short or a corrupt block length
          (scapy raises EOFError for all of them);
        * ``if_tsoffset`` (IDB option 14, pcapng §4.2) is applied — scapy ignores it;
        * interface ids restart with every Section Header Block (pcapng §4.1), as in files
          made by concatenating captures — scapy keeps counting across sections.
        """

        def __init__(self, filename: str, fdesc: IO[bytes], magic: bytes) -> None:
            # (linktype, tsresol, tsoffset) per interface id of the current section
            self.ifaces: list[tuple[int, int, int]] = []
            super().__init__(filename, fdesc, magic)
            self._set_order(self.endian)

        def _set_order(self, endian: str) -> None:
            self.endian = endian
            self._hdr = struct.Struct(endian + "II")
            self._u32 = struct.Struct(endian + "I")
            self._epb = struct.Struct(endian + "IIII")

        def _read_block_shb(self) -> None:
            self.interfaces = []
            self.ifaces = []
            super()._read_block_shb()

        def _read_block_idb(self, block: bytes, size: int) -> None:
            super()._read_block_idb(block, size)
            linktype, _snaplen, opts = self.interfaces[-1]
            tsoffset = 0
            raw = self._read_options(block[8:]).get(14)
            if isinstance(raw, bytes) and len(raw) == 8:
                tsoffset = struct.unpack(self.endian + "q", raw)[0]
            self.ifaces.append((linktype, opts["tsresol"], tsoffset))

        def _next_section(self, rawlen: bytes) -> None:
            """A later Section Header Block (pcapng §4.1); its type is already consumed."""
            bom = self.f.read(4)
            if bom == b"\x1a\x2b\x3c\x4d":
                endian = ">"
            elif bom == b"\x4d\x3c\x2b\x1a":
                endian = "<"
            else:
                raise EOFError
            (blen,) = struct.unpack(endian + "I", rawlen)
            if blen < 28 or blen % 4 or blen > _MAX_BLOCK:
                raise EOFError
            rest = self.f.read(blen - 12)
            if len(rest) < blen - 12:
                raise EOFError
            major = struct.unpack_from(endian + "H", rest)[0]
            if major != 1 or struct.unpack_from(endian + "I", rest, blen - 16)[0] != blen:
                raise EOFError
            self.interfaces = []
            self.ifaces = []
            self._set_order(endian)
            # Blocks before the next EPB are read by ``frames`` after it rebinds its locals.

        def frames(self) -> Iterator[Frame]:
            """Every packet as ``(ts, linktype, frame)``; EOFError on a cut or corrupt block.

            Ends by raising :class:`_CleanEndError` when the file ends at a block boundary.
            """
            read = self.f.read
            while True:  # once per section: the byte order may change
                hdr = self._hdr.unpack
                u32 = self._u32.unpack_from
                epb = self._epb.unpack_from
                ifaces = self.ifaces  # filled in place by IDBs of this section
                last_ts = 0.0
                while True:
                    head = read(8)
                    if len(head) < 8:
                        if head:
                            raise EOFError
                        raise _CleanEndError
                    if head[:4] == _SHB_TYPE:
                        self._next_section(head[4:])
                        break
                    btype, blen = hdr(head)
                    if blen < 12 or blen % 4 or blen > _MAX_BLOCK:
                        raise EOFError
                    body = read(blen - 8)
                    end = blen - 12
                    if len(body) < blen - 8 or u32(body, end)[0] != blen:
                        raise EOFError
                    if btype == _EPB_TYPE:
                        if end < 20:
                            raise EOFError
                        intid, high, low, caplen = epb(body)
                        if caplen > end - 20:
                            raise EOFError
                        if intid >= len(ifaces):
                            continue  # names an interface the section never described
                        linktype, res, offset = ifaces[intid]
                        sec, frac = divmod((high << 32) | low, res)
                        last_ts = sec + frac / res + offset
                        yield last_ts, linktype, body[20 : 20 + caplen]
                        continue
                    handler = self.blocktypes.get(btype)
                    got = handler(body[:end], MAX_RECORD) if handler is not None else None
                    if got is None:
                        continue
                    data, meta = got
                    if meta.tshigh is not None:  # a Simple Packet Block has no timestamp
                        res = meta.tsresol
                        sec, frac = divmod((meta.tshigh << 32) | meta.tslow, res)
                        last_ts = sec + frac / res
                    yield last_ts, meta.linktype, data

    _ng_class = _NgReader
    return _ng_class


def _open_pcapng(path: str, f: IO[bytes], magic: bytes) -> Any:
    from scapy.error import Scapy_Exception

    cls = _pcapng_reader_class()
    # scapy's reader metaclass only accepts a file name in ``__call__``; build the instance
    # directly so it reads from our (possibly gunzipping) stream.
    reader = object.__new__(cls)
    try:
        reader.__init__(path, f, magic)
    except (Scapy_Exception, EOFError, struct.error, zlib.error) as exc:
        raise CaptureError(f"{path}: malformed pcapng section header") from exc
    except OSError as exc:
        raise CaptureError(f"{path}: unreadable: {exc}") from exc
    return reader
