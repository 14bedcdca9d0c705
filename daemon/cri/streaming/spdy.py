"""SPDY/3.1 as Kubernetes speaks it on CRI's streaming URLs.

After the HTTP upgrade, a Kubernetes client (kubectl up to 1.29 for exec, the API
server, client-go) opens one SPDY stream per channel and names it with a
``streamtype`` header; the server answers each with a SYN_REPLY. This module holds
three layers:

* framing: :class:`Framer` (the frames carrying zlib-compressed header blocks, one
  compression context per direction) and the ``encode_*`` functions for the others;
  the tests' client uses them too;
* :class:`Session`: the server side of one connection (stream table, PING answers,
  flow control, orderly or hostile shutdown);
* the two protocols kubelet serves over it: :func:`serve_command` (remotecommand:
  exec and attach) and :func:`serve_portforward`.

Flow control. Kubernetes' SPDY library (spdystream) never sends WINDOW_UPDATE and
ignores ours. Holding such a peer to the 64 KiB initial window would stall every exec
printing more than that, so our windows are tracked from the start but only enforced
once the peer shows it does flow control (it sends a WINDOW_UPDATE or an
INITIAL_WINDOW_SIZE setting). In the other direction we send WINDOW_UPDATEs for what
we take in, and bound memory the only way that works with any peer: when a stream's
reader holds too much unread data, the session stops reading the socket and TCP pushes
back.
"""
from __future__ import annotations

import asyncio
import json
import re
import struct
import zlib
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial

import structlog

from ctrd.errors import InvalidArgument

from .streams import V3, V4, V5, CommandStreams, Options, parse_resize

log = structlog.get_logger()

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
MAX_STREAMS = 256  # open at once; port forwarding uses two per forwarded connection

SEND_CHUNK = 32 * 1024
INBOUND_BUFFER = 64 * 1024  # a stream's reader pauses the session beyond twice this
_WRITE_HIGH_WATER = 1024 * 1024  # the read loop waits for the socket beyond this

STREAM_TIMEOUT = 30.0  # for the client to open the streams it announced, as kubelet
CLOSE_LINGER = 5.0  # after GOAWAY, for the client to read everything and hang up
_CLOSE_TIMEOUT = 1.0
_PORT_FORWARD_GRACE = 1.0  # for the other direction once one has ended, as containerd

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

# remotecommand and portforward stream types and headers (lower case: SPDY/3's rule).
STREAM_TYPE = "streamtype"
ERROR = "error"
STDIN = "stdin"
STDOUT = "stdout"
STDERR = "stderr"
RESIZE = "resize"
DATA = "data"
PORT = "port"
REQUEST_ID = "requestid"


class ProtocolError(InvalidArgument):
    """The peer broke SPDY: the session ends."""


# ---------------------------------------------------------------------------- frames


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


# --------------------------------------------------------------------------- session


@dataclass(eq=False)
class Stream:
    """One stream the client opened.

    ``inbound`` gets the client's data if the stream was accepted with ``inbound=True``
    (and EOF when the client closes its side, resets the stream or goes away);
    otherwise the data is dropped. ``ended`` is set once the stream is over: reset by
    the client, closed both ways, or its session lost.
    """

    id: int
    headers: Headers
    remote_closed: bool = False
    local_closed: bool = False
    reset: bool = False
    send_window: int = INITIAL_WINDOW
    recv_unacked: int = 0
    inbound: asyncio.StreamReader | None = None
    ended: asyncio.Event = field(default_factory=asyncio.Event)
    send_lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    def header(self, name: str) -> str:
        values = self.headers.get(name)
        return values[0] if values else ""


class _Valve(asyncio.ReadTransport):
    """Stands in for a stream reader's transport, so that a reader holding too much
    unread data pauses the session's reading like a socket reader pauses its socket."""

    def __init__(self, pause: Callable[[], None], resume: Callable[[], None]) -> None:
        super().__init__()
        self._pause = pause
        self._resume = resume
        self._paused = False

    def pause_reading(self) -> None:
        self._paused = True
        self._pause()

    def resume_reading(self) -> None:
        self._paused = False
        self._resume()

    def is_reading(self) -> bool:
        return not self._paused


class _Signal:
    """Wakes every task waiting for it (a broadcast, unlike asyncio.Event's set/clear)."""

    def __init__(self) -> None:
        self._future: asyncio.Future[None] | None = None

    async def wait(self) -> None:
        if self._future is None:
            self._future = asyncio.get_running_loop().create_future()
        # Shielded: one waiter cancelled must not cancel the others' future.
        await asyncio.shield(self._future)

    def fire(self) -> None:
        if self._future is not None and not self._future.done():
            self._future.set_result(None)
        self._future = None


class Session:
    """The server side of a SPDY/3.1 connection.

    ``on_stream`` is called (in the reading task, before any data of the stream is
    handled) for each stream the client opens, and must :meth:`accept` or
    :meth:`reject` it. ``lost`` is set when the client went away or broke the protocol;
    from then on sends are no-ops and every inbound reader has EOF.
    """

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 on_stream: Callable[[Stream], None], *, framer: Framer | None = None) -> None:
        self._reader = reader
        self._writer = writer
        self._on_stream = on_stream
        self._framer = framer or Framer()
        self._streams: dict[int, Stream] = {}
        self._last_stream_id = 0
        self._send_window = INITIAL_WINDOW
        self._recv_unacked = 0
        self._initial_window = INITIAL_WINDOW
        self._peer_flow_control = False
        self._paused: set[int] = set()
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._window = _Signal()
        self._write_closed = False
        self._task: asyncio.Task[None] | None = None
        self.lost = asyncio.Event()
        self._log = log.bind(peer=str(writer.get_extra_info("peername") or "?"))

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    # -- the application's side

    def accept(self, stream: Stream, *, inbound: bool = False) -> None:
        """Reply to the stream; with ``inbound`` its data goes to ``stream.inbound``."""
        if inbound:
            reader = asyncio.StreamReader(limit=INBOUND_BUFFER)
            reader.set_transport(_Valve(partial(self._pause, stream.id),
                                        partial(self._resume, stream.id)))
            stream.inbound = reader
            if stream.remote_closed or self.lost.is_set():
                reader.feed_eof()
        self._write(self._framer.syn_reply(stream.id))

    def reject(self, stream: Stream, status: int = CANCEL) -> None:
        self._write(encode_rst_stream(stream.id, status))
        stream.reset = stream.remote_closed = stream.local_closed = True
        self._forget(stream)

    def detach(self, stream: Stream) -> None:
        """Drop the stream's further data (nobody reads it any more)."""
        self._end_inbound(stream)
        stream.inbound = None

    async def send(self, stream: Stream, data: bytes, *, fin: bool = False) -> None:
        """DATA frames on the stream, within the peer's windows if it enforces them;
        quietly nothing once the stream or the session is closed."""
        if not data and not fin:
            return
        async with stream.send_lock:
            view = memoryview(data)
            while not (self.lost.is_set() or stream.local_closed):
                size = min(len(view), SEND_CHUNK)
                if size and self._peer_flow_control:
                    room = min(stream.send_window, self._send_window)
                    if room <= 0:
                        await self._window.wait()
                        continue
                    size = min(size, room)
                last = size == len(view)
                self._write(encode_data(stream.id, view[:size], fin=fin and last))
                stream.send_window -= size
                self._send_window -= size
                view = view[size:]
                if fin and last:
                    stream.local_closed = True
                    self._maybe_forget(stream)
                await self._drain()
                if last:
                    return

    async def close(self, *, linger: float = 0.0) -> None:
        """GOAWAY, then up to ``linger`` seconds for the client to hang up.

        Closing a socket with unread input makes the kernel send RST, which can destroy
        output the client has not read yet; so we half-close and keep reading (and
        dropping) until the client is done.
        """
        self._write(encode_goaway(self._last_stream_id))
        for stream in list(self._streams.values()):
            self.detach(stream)
        if linger > 0 and not self.lost.is_set():
            if self._writer.can_write_eof() and not self._writer.is_closing():
                self._writer.write_eof()
            self._write_closed = True
            try:
                await asyncio.wait_for(self.lost.wait(), linger)
            except TimeoutError:
                self._log.debug("spdy client did not hang up")
        self._write_closed = True
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self._writer.close()
        try:
            await asyncio.wait_for(self._writer.wait_closed(), _CLOSE_TIMEOUT)
        except (TimeoutError, ConnectionError, OSError):
            self._writer.transport.abort()

    # -- reading

    async def _run(self) -> None:
        try:
            while True:
                await self._flowing.wait()
                frame = await self._framer.read(self._reader)
                self._dispatch(frame)
                if self._writer.transport.get_write_buffer_size() > _WRITE_HIGH_WATER:
                    await self._drain()
        except (asyncio.IncompleteReadError, ConnectionError, OSError):
            self._log.debug("spdy connection closed by peer")
        except ProtocolError as e:
            self._log.warning("spdy session ended: peer broke the protocol", error=str(e))
            self._write(encode_goaway(self._last_stream_id, GOAWAY_PROTOCOL_ERROR))
            self._write_closed = True
            self._writer.close()
        except Exception:  # noqa: BLE001 - a bug here ends this session, not the daemon
            self._log.exception("spdy session failed")
            self._write_closed = True
            self._writer.close()
        finally:
            self._lose()

    def _dispatch(self, frame: Frame) -> None:
        match frame:
            case DataFrame():
                self._on_data(frame)
            case SynStream():
                self._on_syn_stream(frame)
            case RstStream():
                stream = self._streams.get(frame.stream_id)
                if stream is not None:
                    stream.reset = stream.remote_closed = stream.local_closed = True
                    self._forget(stream)
                    self._window.fire()
            case Settings():
                self._on_settings(frame)
            case Ping():
                if frame.id % 2:  # ours would be even; odd ones are the client's to echo
                    self._write(encode_ping(frame.id))
            case HeadersFrame():
                stream = self._streams.get(frame.stream_id)
                if frame.fin and stream is not None:
                    self._remote_close(stream)
            case WindowUpdate():
                self._on_window_update(frame)
            case GoAway():
                self._log.debug("spdy client sent GOAWAY", status=frame.status)
            case _:  # SYN_REPLY (we open no streams) and unknown control frames
                pass

    def _on_syn_stream(self, frame: SynStream) -> None:
        stream_id = frame.stream_id
        if stream_id % 2 == 0 or stream_id <= self._last_stream_id:
            raise ProtocolError(f"spdy: client opened stream {stream_id} out of order")
        self._last_stream_id = stream_id
        if len(self._streams) >= MAX_STREAMS:
            self._write(encode_rst_stream(stream_id, REFUSED_STREAM))
            return
        stream = Stream(stream_id, frame.headers, remote_closed=frame.fin,
                        local_closed=frame.unidirectional, send_window=self._initial_window)
        self._streams[stream_id] = stream
        self._on_stream(stream)

    def _on_data(self, frame: DataFrame) -> None:
        size = len(frame.data)
        self._recv_unacked += size
        if self._recv_unacked >= INITIAL_WINDOW // 2:
            self._write(encode_window_update(0, self._recv_unacked))
            self._recv_unacked = 0
        stream = self._streams.get(frame.stream_id)
        if stream is None or stream.remote_closed:
            return  # a stream we closed or never had: its data has nowhere to go
        if size:
            if stream.inbound is not None:
                stream.inbound.feed_data(frame.data)
            stream.recv_unacked += size
            if not frame.fin and stream.recv_unacked >= INITIAL_WINDOW // 2:
                self._write(encode_window_update(stream.id, stream.recv_unacked))
                stream.recv_unacked = 0
        if frame.fin:
            self._remote_close(stream)

    def _on_settings(self, frame: Settings) -> None:
        for _flags, key, value in frame.entries:
            if key != SETTINGS_INITIAL_WINDOW_SIZE:
                continue
            if value > MAX_WINDOW:
                raise ProtocolError(f"spdy: initial window of {value}")
            delta, self._initial_window = value - self._initial_window, value
            for stream in self._streams.values():
                stream.send_window += delta
            self._peer_flow_control = True
            self._window.fire()

    def _on_window_update(self, frame: WindowUpdate) -> None:
        self._peer_flow_control = True
        if frame.stream_id == 0:
            self._send_window = min(self._send_window + frame.delta, MAX_WINDOW)
        elif (stream := self._streams.get(frame.stream_id)) is not None:
            stream.send_window = min(stream.send_window + frame.delta, MAX_WINDOW)
        self._window.fire()

    # -- stream bookkeeping

    def _remote_close(self, stream: Stream) -> None:
        stream.remote_closed = True
        self._end_inbound(stream)
        self._maybe_forget(stream)

    def _end_inbound(self, stream: Stream) -> None:
        if stream.inbound is not None:
            stream.inbound.feed_eof()
        self._resume(stream.id)

    def _maybe_forget(self, stream: Stream) -> None:
        if stream.remote_closed and stream.local_closed:
            self._forget(stream)

    def _forget(self, stream: Stream) -> None:
        self._end_inbound(stream)
        self._streams.pop(stream.id, None)
        stream.ended.set()

    def _pause(self, stream_id: int) -> None:
        if stream_id in self._streams:
            self._paused.add(stream_id)
            self._flowing.clear()

    def _resume(self, stream_id: int) -> None:
        self._paused.discard(stream_id)
        if not self._paused:
            self._flowing.set()

    def _lose(self) -> None:
        self.lost.set()
        for stream in list(self._streams.values()):
            self._forget(stream)
        self._paused.clear()
        self._flowing.set()
        self._window.fire()

    # -- writing

    def _write(self, data: bytes) -> None:
        # Header blocks share one compression context, so frames go out in the order
        # they were encoded: encode and write without an await in between.
        if self._write_closed or self.lost.is_set() or self._writer.is_closing():
            return
        self._writer.write(data)

    async def _drain(self) -> None:
        if self.lost.is_set() or self._writer.is_closing():
            return
        try:
            await self._writer.drain()
        except (ConnectionError, OSError):
            self._lose()


# --------------------------------------------------------------------- remotecommand


def expected_channels(options: Options, version: str) -> frozenset[str]:
    """The streams a client opens for these options, as kubelet counts them: error
    always, stderr never with a TTY, resize with a TTY from v3 on."""
    kinds = {ERROR}
    if options.stdin:
        kinds.add(STDIN)
    if options.stdout:
        kinds.add(STDOUT)
    if options.stderr and not options.tty:
        kinds.add(STDERR)
    if options.tty and version in (V3, V4, V5):
        kinds.add(RESIZE)
    return frozenset(kinds)


async def serve_command(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, options: Options, version: str,
    handler: Callable[[CommandStreams], Awaitable[None]],
) -> None:
    """Serve one exec/attach over an upgraded connection.

    Waits (up to :data:`STREAM_TIMEOUT`) for the client to open the streams the
    options call for, runs ``handler``, then closes the output streams, says GOAWAY and
    closes the connection. If the client goes away meanwhile, the handler sees EOF on
    stdin and its writes become no-ops. If the handler raises, the client gets a
    failure status (unless one was sent) and the exception propagates after cleanup.
    """
    wanted = expected_channels(options, version)
    channels: dict[str, Stream] = {}
    ready = asyncio.Event()

    def on_stream(stream: Stream) -> None:
        kind = stream.header(STREAM_TYPE)
        fresh = kind in wanted and kind not in channels
        if fresh:
            channels[kind] = stream
        else:
            # Accepted all the same, as kubelet does; its data is dropped.
            log.warning("unexpected remotecommand stream", stream_type=kind, stream=stream.id)
        session.accept(stream, inbound=fresh and kind in (STDIN, RESIZE))
        if wanted <= channels.keys():
            ready.set()

    session = Session(reader, writer, on_stream)
    session.start()
    linger = CLOSE_LINGER
    resizes: asyncio.Task[None] | None = None
    try:
        if not await _first_of(ready, session.lost, timeout=STREAM_TIMEOUT):
            if not session.lost.is_set():
                log.warning("remotecommand client did not open its streams",
                            expected=sorted(wanted), opened=sorted(channels))
            linger = 0.0
            return

        async def send_on(kind: str, data: bytes, *, fin: bool = False) -> None:
            if (stream := channels.get(kind)) is not None:
                await session.send(stream, data, fin=fin)

        stdin = channels[STDIN].inbound if STDIN in channels else None
        streams = CommandStreams(
            options=options, version=version,
            write_stdout=partial(send_on, STDOUT), write_stderr=partial(send_on, STDERR),
            send_status=partial(send_on, ERROR, fin=True), stdin=stdin,
        )
        if RESIZE in channels and (source := channels[RESIZE].inbound) is not None:
            resizes = asyncio.create_task(_pump_resizes(source, streams.resizes))
        try:
            await handler(streams)
        except Exception:
            # A v4 client reads an error stream closed without a status as success.
            await streams.finish(None, "error executing command in container")
            raise
    except asyncio.CancelledError:
        linger = 0.0
        raise
    finally:
        if resizes is not None:
            resizes.cancel()
            await asyncio.gather(resizes, return_exceptions=True)
        for stream in channels.values():
            await session.send(stream, b"", fin=True)
        await session.close(linger=linger)


async def _first_of(ready: asyncio.Event, lost: asyncio.Event, *, timeout: float) -> bool:
    """Whether ``ready`` was set before ``lost`` or the timeout."""
    waits = {asyncio.ensure_future(ready.wait()), asyncio.ensure_future(lost.wait())}
    try:
        await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for wait in waits:
            wait.cancel()
    return ready.is_set() and not lost.is_set()


_MAX_RESIZE_BUFFER = 4096
_MAX_QUEUED_RESIZES = 32
_JSON = json.JSONDecoder()


async def _pump_resizes(source: asyncio.StreamReader,
                        queue: asyncio.Queue[tuple[int, int]]) -> None:
    """The resize stream is a sequence of JSON objects (kubectl writes one per line)."""
    pending = b""
    while chunk := await source.read(_MAX_RESIZE_BUFFER):
        pending = _take_resizes(pending + chunk, queue)
        if len(pending) > _MAX_RESIZE_BUFFER:
            pending = b""


def _take_resizes(buffer: bytes, queue: asyncio.Queue[tuple[int, int]]) -> bytes:
    """Queues the complete messages at the front of ``buffer``; returns the rest."""
    text = buffer.decode("latin-1")
    pos = 0
    while True:
        while pos < len(text) and text[pos] in " \t\r\n":
            pos += 1
        if pos == len(text):
            return b""
        try:
            _, end = _JSON.raw_decode(text, pos)
        except json.JSONDecodeError:
            newline = text.find("\n", pos)
            if newline < 0:
                return text[pos:].encode("latin-1")  # may be a message cut in two
            pos = newline + 1  # junk: skip its line
            continue
        size = parse_resize(text[pos:end].encode("latin-1"))
        if size is not None:
            if queue.qsize() >= _MAX_QUEUED_RESIZES:
                queue.get_nowait()  # only the latest sizes matter
            queue.put_nowait(size)
        pos = end


# ----------------------------------------------------------------------- portforward


@dataclass(eq=False)
class _PortPair:
    request_id: str
    port: int
    error: Stream | None = None
    data: Stream | None = None
    expiry: asyncio.Task[None] | None = None


_PORT = re.compile(r"[0-9]{1,5}")


def _parse_port(text: str) -> int | None:
    if not _PORT.fullmatch(text):
        return None
    port = int(text)
    return port if 0 < port <= 0xFFFF else None


def _port_error(port: int, error: BaseException | str, *, close_connection: bool) -> bytes:
    """kubelet's portForwardErrResponse; older clients print it as text."""
    body: dict[str, object] = {"message": f"error forwarding port {port}: {error}"}
    if close_connection:
        body = {"closeConnection": True, **body}
    return json.dumps(body).encode() + b"\n"


async def serve_portforward(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
    connect: Callable[[int], Awaitable[tuple[asyncio.StreamReader, asyncio.StreamWriter]]],
) -> None:
    """Serve port forwarding until the client hangs up.

    For each forwarded connection the client opens an ``error`` and a ``data`` stream
    sharing a ``requestid`` and a ``port`` header; once both are there, ``connect(port)``
    is called and bytes are piped both ways. A connect failure is reported on the error
    stream.
    """
    pairs: dict[str, _PortPair] = {}
    tasks: set[asyncio.Task[None]] = set()

    def spawn(work: Awaitable[None]) -> None:
        task = asyncio.ensure_future(work)
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    def on_stream(stream: Stream) -> None:
        kind = stream.header(STREAM_TYPE)
        port = _parse_port(stream.header(PORT))
        if port is None or kind not in (ERROR, DATA):
            log.warning("bad portforward stream", stream_type=kind, port=stream.header(PORT))
            session.reject(stream)
            return
        request_id = stream.header(REQUEST_ID) or _legacy_request_id(stream.id, kind)
        pair = pairs.get(request_id)
        if pair is None:
            pair = pairs[request_id] = _PortPair(request_id, port)
            pair.expiry = asyncio.create_task(_expire_pair(session, pairs, pair))
            tasks.add(pair.expiry)
            pair.expiry.add_done_callback(tasks.discard)
        if getattr(pair, kind) is not None:
            # Accepted all the same, as kubelet does, but nothing will read it.
            session.accept(stream)
            if pair.error is not None:
                message = f"{kind} stream already assigned for request {request_id}"
                spawn(session.send(pair.error, message.encode()))
            return
        session.accept(stream, inbound=kind == DATA)
        setattr(pair, kind, stream)
        if pair.error is not None and pair.data is not None:
            del pairs[request_id]
            if pair.expiry is not None:
                pair.expiry.cancel()
            spawn(_forward(session, pair, connect))

    session = Session(reader, writer, on_stream)
    session.start()
    try:
        await session.lost.wait()
    finally:
        for task in list(tasks):
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await session.close()


def _legacy_request_id(stream_id: int, kind: str) -> str:
    # Clients from before the requestid header open error then data, two ids apart.
    return str(stream_id if kind == ERROR else stream_id - 2)


async def _expire_pair(session: Session, pairs: dict[str, _PortPair], pair: _PortPair) -> None:
    await asyncio.sleep(STREAM_TIMEOUT)
    if pairs.get(pair.request_id) is not pair:
        return
    del pairs[pair.request_id]
    log.warning("portforward client did not open both streams", request=pair.request_id)
    if pair.data is not None:
        session.reject(pair.data)
    if pair.error is not None:
        await session.send(pair.error, b"timed out waiting for streams", fin=True)


async def _forward(
    session: Session, pair: _PortPair,
    connect: Callable[[int], Awaitable[tuple[asyncio.StreamReader, asyncio.StreamWriter]]],
) -> None:
    assert pair.data is not None and pair.error is not None
    data, error = pair.data, pair.error
    bound = log.bind(port=pair.port, request=pair.request_id)
    try:
        target_reader, target_writer = await connect(pair.port)
    except Exception as e:  # noqa: BLE001 - whatever the dialer raised, the client reads it
        bound.info("portforward connect failed", error=str(e))
        await session.send(error, _port_error(pair.port, e, close_connection=True), fin=True)
        await session.send(data, b"", fin=True)
        return
    upload = asyncio.create_task(_upload(data, target_writer))
    download = asyncio.create_task(_download(session, target_reader, data))
    ended = asyncio.create_task(data.ended.wait())
    failure: OSError | None = None
    try:
        await asyncio.wait({download, ended}, return_when=asyncio.FIRST_COMPLETED)
        if download.done():
            failure = download.result()
            await session.send(data, b"", fin=True)
            await asyncio.wait({upload, ended}, timeout=_PORT_FORWARD_GRACE,
                               return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (upload, download, ended):
            task.cancel()
        await asyncio.gather(upload, download, ended, return_exceptions=True)
        target_writer.close()
        try:
            await asyncio.wait_for(target_writer.wait_closed(), _CLOSE_TIMEOUT)
        except (TimeoutError, ConnectionError, OSError):
            target_writer.transport.abort()
    if failure is not None:
        bound.info("portforward connection failed", error=str(failure))
        await session.send(error, _port_error(pair.port, failure, close_connection=False))
    await session.send(data, b"", fin=True)
    await session.send(error, b"", fin=True)


async def _upload(data: Stream, target: asyncio.StreamWriter) -> None:
    """Client to target; the client's FIN becomes a half-close of the target."""
    source = data.inbound
    if source is None:
        return
    try:
        while chunk := await source.read(SEND_CHUNK):
            target.write(chunk)
            await target.drain()
        if target.can_write_eof():
            target.write_eof()
    except (ConnectionError, OSError):
        pass  # the download side sees the same connection end


async def _download(session: Session, target: asyncio.StreamReader,
                    data: Stream) -> OSError | None:
    """Target to client, until the target closes; returns how it failed, if it did."""
    try:
        while chunk := await target.read(SEND_CHUNK):
            await session.send(data, chunk)
    except (ConnectionError, OSError) as e:
        return e
    return None
