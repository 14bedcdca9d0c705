"""The SPDY/3.1 wire layer: frame types and status codes, the frames as records, the
``encode_*`` functions for frames without header blocks and :class:`Framer` for the
frames carrying zlib-compressed header blocks (one compression context per direction);
the tests' client uses them too."""
from __future__ import annotations

import asyncio
import struct
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from ctrd.errors import InvalidArgument

VERSION = 3

# Control frame types.
SYN_STREAM = 1
SYN_REPLY = 2
RST_STREAM = 3
SETTINGS = 4
PING = 6
GOAWAY = 7
HEADERS = 8
WINDOW_UPDATE = 9

FLAG_FIN = 0x01
FLAG_UNIDIRECTIONAL = 0x02  # SYN_STREAM only

# RST_STREAM status codes.
PROTOCOL_ERROR = 1
INVALID_STREAM = 2
REFUSED_STREAM = 3
UNSUPPORTED_VERSION = 4
CANCEL = 5
INTERNAL_ERROR = 6
FLOW_CONTROL_ERROR = 7
FRAME_TOO_LARGE = 11

# GOAWAY status codes.
GOAWAY_OK = 0
GOAWAY_PROTOCOL_ERROR = 1
GOAWAY_INTERNAL_ERROR = 2

SETTINGS_INITIAL_WINDOW_SIZE = 7

INITIAL_WINDOW = 64 * 1024
MAX_WINDOW = 0x7FFFFFFF
_ID_MASK = 0x7FFFFFFF

# Limits against hostile peers. Kubernetes' clients write DATA frames of at most 32 KiB
# (Go's io.Copy buffer) and header blocks of a few hundred bytes.
MAX_DATA_FRAME = 1024 * 1024
MAX_CONTROL_FRAME = 64 * 1024
MAX_HEADER_BLOCK = 64 * 1024  # decompressed

# The dictionary both zlib contexts of a SPDY/3 session start from (a wire constant of
# the SPDY/3 draft): header names and common values, each behind its 32-bit length,
# then a run of status lines, dates and media types without lengths.
_DICTIONARY_WORDS = (
    "options", "head", "post", "put", "delete", "trace", "accept", "accept-charset",
    "accept-encoding", "accept-language", "accept-ranges", "age", "allow",
    "authorization", "cache-control", "connection", "content-base", "content-encoding",
    "content-language", "content-length", "content-location", "content-md5",
    "content-range", "content-type", "date", "etag", "expect", "expires", "from", "host",
    "if-match", "if-modified-since", "if-none-match", "if-range", "if-unmodified-since",
    "last-modified", "location", "max-forwards", "pragma", "proxy-authenticate",
    "proxy-authorization", "range", "referer", "retry-after", "server", "te", "trailer",
    "transfer-encoding", "upgrade", "user-agent", "vary", "via", "warning",
    "www-authenticate", "method", "get", "status", "200 OK", "version", "HTTP/1.1", "url",
    "public", "set-cookie", "keep-alive", "origin",
)
_DICTIONARY_TAIL = (
    "100101201202205206300302303304305306307402405406407408409410411412413414415416417"
    "502504505"
    "203 Non-Authoritative Information204 No Content301 Moved Permanently"
    "400 Bad Request401 Unauthorized403 Forbidden404 Not Found"
    "500 Internal Server Error501 Not Implemented503 Service Unavailable"
    "Jan Feb Mar Apr May Jun Jul Aug Sept Oct Nov Dec 00:00:00 "
    "Mon, Tue, Wed, Thu, Fri, Sat, Sun, GMT"
    "chunked,text/html,image/png,image/jpg,image/gif,application/xml,"
    "application/xhtml+xml,text/plain,text/javascript,publicprivatemax-age="
    "gzip,deflate,sdchcharset=utf-8charset=iso-8859-1,utf-,*,enq=0."
)
DICTIONARY = b"".join(
    struct.pack("!I", len(word)) + word.encode() for word in _DICTIONARY_WORDS
) + _DICTIONARY_TAIL.encode()

Headers = dict[str, list[str]]


class ProtocolError(InvalidArgument):
    """The peer broke SPDY: the session ends."""


@dataclass(frozen=True, slots=True)
class DataFrame:
    stream_id: int
    data: bytes
    fin: bool = False


@dataclass(frozen=True, slots=True)
class SynStream:
    stream_id: int
    headers: Headers
    fin: bool = False
    unidirectional: bool = False
    associated_id: int = 0
    priority: int = 0


@dataclass(frozen=True, slots=True)
class SynReply:
    stream_id: int
    headers: Headers
    fin: bool = False


@dataclass(frozen=True, slots=True)
class HeadersFrame:
    stream_id: int
    headers: Headers
    fin: bool = False


@dataclass(frozen=True, slots=True)
class RstStream:
    stream_id: int
    status: int


@dataclass(frozen=True, slots=True)
class Settings:
    entries: tuple[tuple[int, int, int], ...]  # (flags, id, value)


@dataclass(frozen=True, slots=True)
class Ping:
    id: int


@dataclass(frozen=True, slots=True)
class GoAway:
    last_stream_id: int
    status: int


@dataclass(frozen=True, slots=True)
class WindowUpdate:
    stream_id: int  # 0: the whole session (SPDY/3.1)
    delta: int


@dataclass(frozen=True, slots=True)
class UnknownControl:
    type: int
    flags: int


Frame = (
    DataFrame | SynStream | SynReply | HeadersFrame | RstStream | Settings | Ping | GoAway
    | WindowUpdate | UnknownControl
)


def _control(frame_type: int, flags: int, payload: bytes) -> bytes:
    if len(payload) > 0xFFFFFF:
        raise InvalidArgument("spdy: control frame too large")
    head = struct.pack("!HHI", 0x8000 | VERSION, frame_type, (flags << 24) | len(payload))
    return head + payload


def encode_data(stream_id: int, data: bytes | memoryview = b"", *, fin: bool = False) -> bytes:
    if len(data) > 0xFFFFFF:
        raise InvalidArgument("spdy: data frame too large")
    flags = FLAG_FIN if fin else 0
    return struct.pack("!II", stream_id & _ID_MASK, (flags << 24) | len(data)) + bytes(data)


def encode_rst_stream(stream_id: int, status: int) -> bytes:
    return _control(RST_STREAM, 0, struct.pack("!II", stream_id & _ID_MASK, status))


def encode_settings(entries: Mapping[int, int]) -> bytes:
    body = b"".join(struct.pack("!II", key & 0xFFFFFF, value) for key, value in entries.items())
    return _control(SETTINGS, 0, struct.pack("!I", len(entries)) + body)


def encode_ping(ping_id: int) -> bytes:
    return _control(PING, 0, struct.pack("!I", ping_id))


def encode_goaway(last_stream_id: int, status: int = GOAWAY_OK) -> bytes:
    return _control(GOAWAY, 0, struct.pack("!II", last_stream_id & _ID_MASK, status))


def encode_window_update(stream_id: int, delta: int) -> bytes:
    return _control(WINDOW_UPDATE, 0, struct.pack("!II", stream_id & _ID_MASK, delta & _ID_MASK))


def encode_header_block(headers: Mapping[str, str | Sequence[str]]) -> bytes:
    """The uncompressed name/value block; several values of one name are NUL-joined."""
    parts = [struct.pack("!I", len(headers))]
    for name, value in headers.items():
        raw_name = name.lower().encode()
        raw_value = (value if isinstance(value, str) else "\0".join(value)).encode()
        parts += [struct.pack("!I", len(raw_name)), raw_name, struct.pack("!I", len(raw_value)),
                  raw_value]
    return b"".join(parts)


def parse_header_block(raw: bytes) -> Headers:
    """An uncompressed name/value block; raises ProtocolError if it is malformed."""
    if len(raw) < 4:
        raise ProtocolError("spdy: truncated header block")
    (count,) = struct.unpack_from("!I", raw)
    if count > (len(raw) - 4) // 8:  # each pair takes at least its two lengths
        raise ProtocolError("spdy: header block announces more pairs than it holds")
    headers: Headers = {}
    pos = 4
    for _ in range(count):
        name, pos = _field(raw, pos)
        value, pos = _field(raw, pos)
        if not name:
            raise ProtocolError("spdy: empty header name")
        values = value.decode("latin-1").split("\0")
        headers.setdefault(name.decode("latin-1").lower(), []).extend(values)
    if pos != len(raw):
        raise ProtocolError("spdy: trailing bytes in header block")
    return headers


def _field(raw: bytes, pos: int) -> tuple[bytes, int]:
    if pos + 4 > len(raw):
        raise ProtocolError("spdy: truncated header block")
    (size,) = struct.unpack_from("!I", raw, pos)
    end = pos + 4 + size
    if end > len(raw):
        raise ProtocolError("spdy: truncated header block")
    return raw[pos + 4:end], end


class Framer:
    """One side's frame codec.

    SPDY/3 compresses every header block of a direction with one zlib stream primed
    with :data:`DICTIONARY`, so the frames that carry one must be encoded (and decoded)
    in wire order by the same Framer. Frames without header blocks need no state: use
    the ``encode_*`` functions.
    """

    def __init__(self, *, max_data: int = MAX_DATA_FRAME, max_control: int = MAX_CONTROL_FRAME,
                 max_headers: int = MAX_HEADER_BLOCK) -> None:
        self.max_data = max_data
        self.max_control = max_control
        self.max_headers = max_headers
        self._deflate = zlib.compressobj(zdict=DICTIONARY)
        self._inflate = zlib.decompressobj(zdict=DICTIONARY)

    def _compress(self, headers: Mapping[str, str | Sequence[str]]) -> bytes:
        raw = encode_header_block(headers)
        return self._deflate.compress(raw) + self._deflate.flush(zlib.Z_SYNC_FLUSH)

    def syn_stream(self, stream_id: int, headers: Mapping[str, str | Sequence[str]], *,
                   fin: bool = False, unidirectional: bool = False, priority: int = 0) -> bytes:
        flags = (FLAG_FIN if fin else 0) | (FLAG_UNIDIRECTIONAL if unidirectional else 0)
        head = struct.pack("!IIBB", stream_id & _ID_MASK, 0, (priority & 7) << 5, 0)
        return _control(SYN_STREAM, flags, head + self._compress(headers))

    def syn_reply(self, stream_id: int, headers: Mapping[str, str | Sequence[str]] | None = None,
                  *, fin: bool = False) -> bytes:
        payload = struct.pack("!I", stream_id & _ID_MASK) + self._compress(headers or {})
        return _control(SYN_REPLY, FLAG_FIN if fin else 0, payload)

    def headers(self, stream_id: int, headers: Mapping[str, str | Sequence[str]], *,
                fin: bool = False) -> bytes:
        payload = struct.pack("!I", stream_id & _ID_MASK) + self._compress(headers)
        return _control(HEADERS, FLAG_FIN if fin else 0, payload)

    async def read(self, reader: asyncio.StreamReader) -> Frame:
        """The next frame; IncompleteReadError at the end of the connection."""
        first, second = struct.unpack("!II", await reader.readexactly(8))
        flags, length = second >> 24, second & 0xFFFFFF
        if not first & 0x80000000:
            if length > self.max_data:
                raise ProtocolError(f"spdy: data frame of {length} bytes")
            stream_id = first & _ID_MASK
            if stream_id == 0:
                raise ProtocolError("spdy: data frame on stream 0")
            data = await reader.readexactly(length) if length else b""
            return DataFrame(stream_id, data, bool(flags & FLAG_FIN))
        version = (first >> 16) & 0x7FFF
        if version != VERSION:
            raise ProtocolError(f"spdy: unsupported version {version}")
        if length > self.max_control:
            raise ProtocolError(f"spdy: control frame of {length} bytes")
        return self.decode_control(first & 0xFFFF, flags, await reader.readexactly(length))

    def decode_control(self, frame_type: int, flags: int, payload: bytes) -> Frame:
        fin = bool(flags & FLAG_FIN)
        if frame_type == SYN_STREAM:
            _need(payload, 10, exact=False)
            stream_id, associated, priority = struct.unpack_from("!IIB", payload)
            return SynStream(stream_id & _ID_MASK, self._decompress(payload[10:]), fin,
                             bool(flags & FLAG_UNIDIRECTIONAL), associated & _ID_MASK,
                             priority >> 5)
        if frame_type in (SYN_REPLY, HEADERS):
            _need(payload, 4, exact=False)
            (stream_id,) = struct.unpack_from("!I", payload)
            kind = SynReply if frame_type == SYN_REPLY else HeadersFrame
            return kind(stream_id & _ID_MASK, self._decompress(payload[4:]), fin)
        if frame_type == RST_STREAM:
            _need(payload, 8)
            stream_id, status = struct.unpack("!II", payload)
            return RstStream(stream_id & _ID_MASK, status)
        if frame_type == SETTINGS:
            _need(payload, 4, exact=False)
            (count,) = struct.unpack_from("!I", payload)
            if len(payload) != 4 + 8 * count:
                raise ProtocolError("spdy: malformed SETTINGS frame")
            entries = tuple(
                (word >> 24, word & 0xFFFFFF, value)
                for word, value in struct.iter_unpack("!II", payload[4:])
            )
            return Settings(entries)
        if frame_type == PING:
            _need(payload, 4)
            return Ping(struct.unpack("!I", payload)[0])
        if frame_type == GOAWAY:
            _need(payload, 8)
            last, status = struct.unpack("!II", payload)
            return GoAway(last & _ID_MASK, status)
        if frame_type == WINDOW_UPDATE:
            _need(payload, 8)
            stream_id, delta = struct.unpack("!II", payload)
            return WindowUpdate(stream_id & _ID_MASK, delta & _ID_MASK)
        return UnknownControl(frame_type, flags)

    def _decompress(self, block: bytes) -> Headers:
        try:
            raw = self._inflate.decompress(block, self.max_headers + 1)
        except zlib.error as e:
            raise ProtocolError(f"spdy: undecodable header block: {e}") from None
        if len(raw) > self.max_headers:
            raise ProtocolError("spdy: header block decompresses beyond the limit")
        return parse_header_block(raw)


def _need(payload: bytes, size: int, *, exact: bool = True) -> None:
    if len(payload) < size or (exact and len(payload) != size):
        raise ProtocolError(f"spdy: control frame of wrong length {len(payload)}")
