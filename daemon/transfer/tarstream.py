"""Reading and writing tar archives as byte streams, for image archive import/export.

The archive arrives (or leaves) as a flow of chunks over a Streaming stream, never as
a seekable file, and members can be gigabytes: the reader parses headers itself and
hands out each member's data as it comes, so a blob goes straight into the content
store without touching a temporary file. It knows ustar, GNU long names and pax
headers, which covers what docker, containerd, skopeo and Python's tarfile write.
Anything else malformed is reported as InvalidArgument naming the offset.
"""
from __future__ import annotations

import posixpath
import tarfile
from collections.abc import AsyncIterator
from dataclasses import dataclass

from ctrd.errors import InvalidArgument

BLOCK = 512
# Extended headers (pax records, GNU long names) are tiny in practice.
MAX_EXTENDED_HEADER = 1 << 20
_READ_CHUNK = 1 << 20

REGULAR = "0"
SYMLINK = "2"
DIRECTORY = "5"


@dataclass(frozen=True)
class Member:
    name: str  # cleaned: relative, no "." or ".." components
    type: str  # the typeflag, "0" for regular files
    size: int
    linkname: str = ""


def clean_path(name: str) -> str:
    """A member path made relative and canonical; InvalidArgument if it escapes the root."""
    raw = name
    while name.startswith("./"):
        name = name[2:]
    if name.startswith("/") or "\x00" in name:
        raise InvalidArgument(f"unsafe path {raw!r} in archive")
    cleaned = posixpath.normpath(name) if name else ""
    if cleaned == ".." or cleaned.startswith("../"):
        raise InvalidArgument(f"unsafe path {raw!r} in archive (escapes the archive root)")
    return "" if cleaned == "." else cleaned


def _field(block: bytes, start: int, length: int) -> str:
    raw = block[start:start + length]
    end = raw.find(b"\x00")
    return (raw if end < 0 else raw[:end]).decode("utf-8", "surrogateescape")


def _number(block: bytes, start: int, length: int, offset: int) -> int:
    raw = block[start:start + length]
    if raw and raw[0] & 0x80:
        # Base-256 (GNU/star) for values that do not fit in octal.
        value = int.from_bytes(raw[1:], "big")
        if raw[0] & 0x40:
            raise InvalidArgument(f"negative number in tar header at offset {offset}")
        return value + ((raw[0] & 0x3F) << (8 * (len(raw) - 1)))
    text = raw.replace(b"\x00", b" ").strip()
    if not text:
        return 0
    try:
        return int(text, 8)
    except ValueError:
        raise InvalidArgument(
            f"not a readable tar archive: bad number in header at offset {offset}") from None


def _checksum_ok(block: bytes) -> bool:
    stored = block[148:156].replace(b"\x00", b" ").strip()
    try:
        expected = int(stored, 8)
    except ValueError:
        return False
    header = block[:148] + b" " * 8 + block[156:]
    unsigned = sum(header)
    signed = sum(b - 256 if b > 127 else b for b in header)
    return expected in (unsigned, signed)


def _pax_records(data: bytes, offset: int) -> dict[str, str]:
    records: dict[str, str] = {}
    pos = 0
    while pos < len(data):
        space = data.find(b" ", pos)
        if space < 0:
            break
        try:
            length = int(data[pos:space])
        except ValueError:
            raise InvalidArgument(f"bad pax header at offset {offset}") from None
        if length <= 0 or pos + length > len(data):
            raise InvalidArgument(f"bad pax header at offset {offset}")
        record = data[space + 1:pos + length - 1]
        key, sep, value = record.partition(b"=")
        if not sep:
            raise InvalidArgument(f"bad pax header at offset {offset}")
        records[key.decode("utf-8", "surrogateescape")] = value.decode("utf-8",
                                                                     "surrogateescape")
        pos += length
    return records


class TarReader:
    """Members of a tar archive read from an async stream of byte chunks, in order.

    Use as ``async for member in reader:``; read or skip the member's data with
    :meth:`data` before asking for the next one (unread data is skipped for you).
    """

    def __init__(self, chunks: AsyncIterator[bytes]) -> None:
        self._chunks = chunks
        self._buffer = bytearray()
        self._eof = False
        self.offset = 0  # bytes consumed so far, for error messages
        self._remaining = 0  # data bytes of the current member not yet read
        self._padding = 0

    async def _fill(self, n: int) -> bool:
        while len(self._buffer) < n and not self._eof:
            try:
                chunk = await anext(self._chunks)
            except StopAsyncIteration:
                self._eof = True
                break
            self._buffer += chunk
        return len(self._buffer) >= n

    async def _take(self, n: int, what: str) -> bytes:
        if not await self._fill(n):
            raise InvalidArgument(f"truncated tar archive: {what} ends at offset "
                                  f"{self.offset + len(self._buffer)}")
        data = bytes(self._buffer[:n])
        del self._buffer[:n]
        self.offset += n
        return data

    async def data(self, limit: int | None = None) -> AsyncIterator[bytes]:
        """The current member's data in chunks (at most ``limit`` bytes are allowed)."""
        if limit is not None and self._remaining > limit:
            raise InvalidArgument(f"archive member of {self._remaining} bytes is over the "
                                  f"limit of {limit} bytes")
        while self._remaining:
            if not self._buffer:
                await self._fill(1)
                if not self._buffer:
                    raise InvalidArgument(
                        f"truncated tar archive: member data ends at offset {self.offset} "
                        f"with {self._remaining} bytes missing")
            size = min(self._remaining, len(self._buffer), _READ_CHUNK)
            chunk = bytes(self._buffer[:size])
            del self._buffer[:size]
            self.offset += size
            self._remaining -= size
            yield chunk

    async def read_all(self, limit: int) -> bytes:
        return b"".join([chunk async for chunk in self.data(limit)])

    async def _finish_member(self) -> None:
        async for _ in self.data():
            pass
        if self._padding:
            await self._take(self._padding, "member padding")
            self._padding = 0

    def __aiter__(self) -> TarReader:
        return self

    async def __anext__(self) -> Member:
        await self._finish_member()
        long_name = long_link = ""
        pax: dict[str, str] = {}
        while True:
            start = self.offset
            if not await self._fill(1):
                if start == 0:
                    raise InvalidArgument("not a readable tar archive: the stream is empty")
                # A missing end-of-archive marker is tolerated, as by other readers.
                raise StopAsyncIteration
            block = await self._take(BLOCK, "header")
            if block == bytes(BLOCK):
                raise StopAsyncIteration
            if not _checksum_ok(block):
                raise InvalidArgument(
                    f"not a readable tar archive: bad header checksum at offset {start}")
            kind = chr(block[156]) if block[156] else REGULAR
            size = _number(block, 124, 12, start)
            if kind in ("L", "K", "x", "g"):
                if size > MAX_EXTENDED_HEADER:
                    raise InvalidArgument(f"extended tar header of {size} bytes at offset {start}")
                data = await self._take(size + (-size % BLOCK), "extended header")
                data = data[:size]
                if kind == "L":
                    long_name = data.rstrip(b"\x00").decode("utf-8", "surrogateescape")
                elif kind == "K":
                    long_link = data.rstrip(b"\x00").decode("utf-8", "surrogateescape")
                elif kind == "x":
                    pax.update(_pax_records(data, start))
                continue
            name = _field(block, 0, 100)
            magic = block[257:263]
            if magic == b"ustar\x00":  # POSIX ustar: a prefix field extends the name
                prefix = _field(block, 345, 155)
                if prefix:
                    name = f"{prefix}/{name}"
            name = pax.get("path") or long_name or name
            linkname = pax.get("linkpath") or long_link or _field(block, 157, 100)
            if "size" in pax:
                try:
                    size = int(pax["size"])
                except ValueError:
                    raise InvalidArgument(f"bad pax size at offset {start}") from None
            if kind in (SYMLINK, DIRECTORY, "1", "3", "4", "6"):
                size = 0 if kind != "1" else size
            if size < 0:
                raise InvalidArgument(f"negative member size at offset {start}")
            self._remaining = size
            self._padding = -size % BLOCK
            if kind == "7":
                kind = REGULAR  # contiguous files are plain files to every reader
            return Member(clean_path(name), kind, size, linkname)


def header(name: str, size: int, *, directory: bool = False, mode: int = 0o444) -> bytes:
    """A ustar header block, with zero owner and time as containerd's exporter writes."""
    info = tarfile.TarInfo(name)
    info.size = 0 if directory else size
    info.mode = mode
    info.type = tarfile.DIRTYPE if directory else tarfile.REGTYPE
    info.mtime = 0
    info.uname = info.gname = ""
    return info.tobuf(format=tarfile.USTAR_FORMAT)


def padding(size: int) -> bytes:
    return bytes(-size % BLOCK)


# Two zero blocks end an archive.
END = bytes(2 * BLOCK)
