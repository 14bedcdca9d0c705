"""One client connection: HTTP/2 framing, flow control and the calls it carries.

Everything runs on the event loop, in ``data_received``, without a thread or a task
per frame: a small unary call arrives as one read holding HEADERS and DATA, and its
answer leaves as one write holding HEADERS, DATA and the trailers. That is what makes
the 32 KiB ``Content.Read`` calls of `ctr content get` cheap.

Flow control: the connection window is given back as soon as bytes arrive (what
bounds memory is the per-stream window); a stream's window is given back while the
messages its handler has not read yet stay under :data:`QUEUE_LIMIT`, so a handler
that stops reading stops its client, and a message larger than the window still
arrives.
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import struct
from typing import TYPE_CHECKING, NamedTuple

import hpack
import structlog

from . import frames
from .call import Call, Metadatum, RequestError, parse_timeout, trailers_only
from .frames import ProtocolError
from .handlers import MethodHandler
from .status import StatusCode

if TYPE_CHECKING:
    from .server import Server

log = structlog.get_logger()

STREAM_WINDOW = 1 << 20  # what each call may have in flight towards us
CONNECTION_WINDOW = 16 << 20
QUEUE_LIMIT = STREAM_WINDOW  # unread request bytes per call before we stop acking
MAX_CONCURRENT_STREAMS = 1000
MAX_HEADER_LIST = 1 << 20
PREFACE_TIMEOUT = 20.0  # seconds a new connection has to start speaking HTTP/2
FLUSH_SIZE = 256 << 10  # queued output that is sent at once rather than at the loop's turn
# HPACK's one-byte "indexed header field" codes: 1xxxxxxx, index 1 to 126.
_ONE_BYTE_INDEXED = bytes(range(0x81, 0xFF))
_HEAD = struct.Struct(">IBI")  # 24-bit length + type, flags, stream id
_REQUEST_HEADERS = frozenset((b":method", b":path", b":scheme", b":authority"))
# Headers that belong to the transport, not to the metadata a handler sees.
_TRANSPORT_HEADERS = frozenset((
    b"te", b"content-type", b"grpc-timeout", b"grpc-encoding", b"grpc-accept-encoding",
    b"user-agent", b"grpc-message-type"))


class _Request(NamedTuple):
    path: str
    handler: MethodHandler
    metadata: tuple[Metadatum, ...]
    timeout: float | None


class _Refusal(NamedTuple):
    """A request answered without running anything: an HTTP status, or else a gRPC one."""

    http_status: int
    code: StatusCode | None = None
    message: str = ""


class Connection(asyncio.Protocol):
    def __init__(self, server: Server) -> None:
        self.server = server
        self.loop = asyncio.get_running_loop()
        self.peer_initial_window = frames.DEFAULT_WINDOW
        self.peer_max_frame = frames.DEFAULT_MAX_FRAME
        self.send_window = frames.DEFAULT_WINDOW
        self.calls: dict[int, Call] = {}
        self.last_stream_id = 0
        self._transport: asyncio.Transport | None = None
        self._out: list[bytes] = []
        self._out_size = 0
        self._parsing = False
        self._buf = bytearray()
        self._need = 0  # bytes _buf must hold before parsing resumes
        self._preface = False
        self._decoder = hpack.Decoder(max_header_list_size=MAX_HEADER_LIST)
        self._continuing: tuple[int, int, bytearray] | None = None  # stream, flags, block
        self._requests: dict[bytes, _Request | _Refusal] = {}
        self._recv_window = CONNECTION_WINDOW
        self._window_changed = asyncio.Event()
        self._writable = asyncio.Event()
        self._writable.set()
        self._going_away = False
        self.closed = False

    # ------------------------------------------------------------ transport

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]
        self.server.connections.add(self)
        # A peer that connects and never says a word would hold its socket forever.
        self.loop.call_later(PREFACE_TIMEOUT, self._check_preface)
        transport.write(  # type: ignore[attr-defined]
            frames.settings({frames.MAX_CONCURRENT_STREAMS: MAX_CONCURRENT_STREAMS,
                             frames.INITIAL_WINDOW_SIZE: STREAM_WINDOW,
                             frames.MAX_HEADER_LIST_SIZE: MAX_HEADER_LIST})
            + frames.window_update(0, CONNECTION_WINDOW - frames.DEFAULT_WINDOW))

    def _check_preface(self) -> None:
        if not self._preface and not self.closed:
            log.info("rpc connection closed: no HTTP/2 preface", seconds=PREFACE_TIMEOUT)
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.server.connections.discard(self)
        for call in list(self.calls.values()):
            call.cancel("connection")
        self._window_changed.set()
        self._writable.set()

    def pause_writing(self) -> None:
        # The peer does not read what we send. Reading on would let it make us queue
        # answers without bound (a flood of PINGs or SETTINGS, each acknowledged), so
        # it gets no further hearing until it catches up.
        self._writable.clear()
        self._transport.pause_reading()

    def resume_writing(self) -> None:
        self._writable.set()
        if not self.closed:
            self._transport.resume_reading()

    def write(self, data: bytes) -> None:
        """Queue ``data``; everything queued in one loop iteration leaves in one send.

        A streaming call's last message and its trailers, or the answers to calls
        that arrived together, then cost the client one wake-up instead of several."""
        if self.closed:
            return
        self._out.append(data)
        self._out_size += len(data)
        if self._out_size >= FLUSH_SIZE:
            self.flush()  # a handler writing without pause must not pile up output
        elif len(self._out) == 1 and not self._parsing:
            self.loop.call_soon(self.flush)

    def flush(self) -> None:
        out, self._out, self._out_size = self._out, [], 0
        if out and not self.closed:
            self._transport.write(out[0] if len(out) == 1 else b"".join(out))

    def close(self) -> None:
        if self._transport is not None and not self.closed:
            self.flush()
            self._transport.close()

    # ------------------------------------------------------------- reading

    def data_received(self, data: bytes) -> None:
        if self._buf:
            self._buf += data
            if len(self._buf) < self._need:
                return
            data = bytes(self._buf)
            self._buf = bytearray()
        # What parsing queues (a PING's answer, window updates) waits for the calls it
        # started: their first steps run before the flush scheduled here, so a small
        # call's answer usually leaves in the same send.
        self._parsing = True
        try:
            rest = self._parse(data)
        except ProtocolError as exc:
            self._abort(exc.code, str(exc))
            return
        finally:
            self._parsing = False
            if self._out:
                self.loop.call_soon(self.flush)
        if rest:
            self._buf = bytearray(rest)

    def _parse(self, data: bytes) -> bytes:
        pos = 0
        if not self._preface:
            if len(data) < len(frames.PREFACE):
                self._need = len(frames.PREFACE)
                return data
            if not data.startswith(frames.PREFACE):
                raise ProtocolError(frames.PROTOCOL_ERROR, "not an HTTP/2 client preface")
            self._preface = True
            pos = len(frames.PREFACE)
        view = memoryview(data)
        size = len(data)
        while size - pos >= frames.FRAME_HEADER:
            length_kind, flags, stream_id = _HEAD.unpack_from(data, pos)
            length, kind = length_kind >> 8, length_kind & 0xFF
            if length > frames.DEFAULT_MAX_FRAME:
                raise ProtocolError(frames.FRAME_SIZE_ERROR, f"frame of {length} bytes")
            end = pos + frames.FRAME_HEADER + length
            if end > size:
                self._need = end - pos
                return data[pos:]
            stream_id &= 0x7FFFFFFF
            payload = view[pos + frames.FRAME_HEADER:end]
            pos = end
            if self._continuing is not None and (
                    kind != frames.CONTINUATION or stream_id != self._continuing[0]):
                raise ProtocolError(frames.PROTOCOL_ERROR, "header block interrupted")
            if kind == frames.DATA:
                self._on_data(stream_id, flags, payload)
            elif kind == frames.HEADERS:
                self._on_headers(stream_id, flags, payload)
            elif kind == frames.CONTINUATION:
                self._on_continuation(stream_id, flags, payload)
            elif kind == frames.RST_STREAM:
                self._on_rst(stream_id, payload)
            elif kind == frames.SETTINGS:
                self._on_settings(stream_id, flags, payload)
            elif kind == frames.PING:
                self._on_ping(stream_id, flags, payload)
            elif kind == frames.WINDOW_UPDATE:
                self._on_window_update(stream_id, payload)
            elif kind == frames.PRIORITY:
                if len(payload) != 5:
                    raise ProtocolError(frames.FRAME_SIZE_ERROR, "PRIORITY of wrong size")
            elif kind == frames.PUSH_PROMISE:
                raise ProtocolError(frames.PROTOCOL_ERROR, "clients may not push")
            elif kind == frames.GOAWAY:
                # The client opens no new streams; the ones it has finish normally.
                log.debug("client sent GOAWAY")
            # Unknown frame types are ignored, as HTTP/2 requires.
        self._need = 0
        return data[pos:] if pos < size else b""

    @staticmethod
    def _unpad(flags: int, payload: memoryview) -> memoryview:
        if not flags & frames.PADDED:
            return payload
        if not payload:
            raise ProtocolError(frames.PROTOCOL_ERROR, "padded frame without pad length")
        pad = payload[0]
        if pad >= len(payload):
            raise ProtocolError(frames.PROTOCOL_ERROR, "padding longer than the frame")
        return payload[1:len(payload) - pad]

    def _on_data(self, stream_id: int, flags: int, payload: memoryview) -> None:
        if stream_id == 0:
            raise ProtocolError(frames.PROTOCOL_ERROR, "DATA on stream 0")
        length = len(payload)
        self._recv_window -= length
        if self._recv_window < 0:
            raise ProtocolError(frames.FLOW_CONTROL_ERROR, "connection window exceeded")
        if self._recv_window < CONNECTION_WINDOW // 2:
            self.write(frames.window_update(0, CONNECTION_WINDOW - self._recv_window))
            self._recv_window = CONNECTION_WINDOW
        call = self.calls.get(stream_id)
        if call is None:
            if stream_id > self.last_stream_id:
                raise ProtocolError(frames.PROTOCOL_ERROR, "DATA on an idle stream")
            return  # a stream we already answered: its bytes are dropped
        if call.remote_closed:
            self._reset(call, frames.STREAM_CLOSED)
            return
        call.unacked += length
        if call.unacked > STREAM_WINDOW:
            self._reset(call, frames.FLOW_CONTROL_ERROR)
            return
        data = self._unpad(flags, payload)
        if data:
            call.receive_data(data)
        if flags & frames.END_STREAM:
            call.receive_end()
        else:
            self.replenish(call)

    def replenish(self, call: Call) -> None:
        """Give a call's window back to the client, unless its handler lags behind."""
        if (call.unacked >= STREAM_WINDOW // 4 and call.queued_bytes < QUEUE_LIMIT
                and not call.remote_closed and not call.closed):
            self.write(frames.window_update(call.stream_id, call.unacked))
            call.unacked = 0

    def _on_headers(self, stream_id: int, flags: int, payload: memoryview) -> None:
        if stream_id == 0 or stream_id % 2 == 0:
            raise ProtocolError(frames.PROTOCOL_ERROR, f"HEADERS on stream {stream_id}")
        block = self._unpad(flags, payload)
        if flags & frames.PRIORITY_FLAG:
            if len(block) < 5:
                raise ProtocolError(frames.FRAME_SIZE_ERROR, "HEADERS too short for priority")
            block = block[5:]
        if flags & frames.END_HEADERS:
            self._on_header_block(stream_id, flags, bytes(block))
        else:
            self._continuing = (stream_id, flags, bytearray(block))

    def _on_continuation(self, stream_id: int, flags: int, payload: memoryview) -> None:
        if self._continuing is None:
            raise ProtocolError(frames.PROTOCOL_ERROR, "CONTINUATION without HEADERS")
        _, first_flags, block = self._continuing
        block += payload
        if len(block) > MAX_HEADER_LIST:
            raise ProtocolError(frames.PROTOCOL_ERROR, "header block too large")
        if flags & frames.END_HEADERS:
            self._continuing = None
            self._on_header_block(stream_id, first_flags, bytes(block))

    def _on_header_block(self, stream_id: int, flags: int, block: bytes) -> None:
        request = self._request_of(block)
        end_stream = bool(flags & frames.END_STREAM)
        call = self.calls.get(stream_id)
        if call is not None:
            # Trailers from the client: only the end of its stream matters.
            if not end_stream:
                raise ProtocolError(frames.PROTOCOL_ERROR, "second HEADERS without END_STREAM")
            call.receive_end()
            return
        if stream_id <= self.last_stream_id:
            self.write(frames.rst_stream(stream_id, frames.STREAM_CLOSED))
            return
        self.last_stream_id = stream_id
        if self._going_away or len(self.calls) >= MAX_CONCURRENT_STREAMS:
            self.write(frames.rst_stream(stream_id, frames.REFUSED_STREAM))
            return
        if isinstance(request, _Refusal):
            if request.http_status:
                self._answer_http(stream_id, request.http_status, end_stream)
            else:
                self._answer_status(stream_id, request.code, request.message, end_stream)
            return
        call = Call(self, stream_id, request.path, request.handler, request.metadata,
                    request.timeout)
        self.calls[stream_id] = call
        call.start()
        if end_stream:
            call.receive_end()

    def _request_of(self, block: bytes) -> _Request | _Refusal:
        """Decode a header block into a request, from the cache when it only names
        table entries.

        A client repeating a call sends the same few bytes each time, every header a
        reference to an entry already in the table. Such a block changes nothing, so
        what it decodes to holds until some other block (which may change the table)
        comes; and what a request is depends on its headers alone.
        """
        request = self._requests.get(block)
        if request is not None:
            return request
        try:
            headers = self._decoder.decode(block, raw=True)
        except hpack.HPACKError as exc:
            raise ProtocolError(frames.COMPRESSION_ERROR, f"bad header block: {exc}") from None
        request = self._parse_request(headers)
        if block.translate(None, _ONE_BYTE_INDEXED):
            self._requests.clear()
        elif len(block) <= 256 and len(self._requests) < 64:
            self._requests[block] = request
        return request

    def _parse_request(self, headers: list[tuple[bytes, bytes]]) -> _Request | _Refusal:
        method = path = content_type = b""
        timeout = encoding = None
        metadata: list[Metadatum] = []
        for name, value in headers:
            if name[:1] == b":":
                if name == b":path":
                    path = value
                elif name == b":method":
                    method = value
                elif name not in _REQUEST_HEADERS:
                    return _Refusal(400)
            elif name == b"content-type":
                content_type = value
            elif name == b"grpc-timeout":
                timeout = value
            elif name == b"grpc-encoding":
                encoding = value
            elif name not in _TRANSPORT_HEADERS:
                key = name.decode("latin-1")
                if key.endswith("-bin"):
                    try:
                        metadata.append(Metadatum(key, base64.b64decode(value + b"==")))
                    except binascii.Error:
                        return _Refusal(0, StatusCode.INTERNAL, f"bad base64 in {key}")
                else:
                    metadata.append(Metadatum(key, value.decode("latin-1")))
        if method != b"POST":
            return _Refusal(405)
        if not content_type.startswith(b"application/grpc"):
            return _Refusal(415)
        if encoding not in (None, b"identity"):
            return _Refusal(0, StatusCode.UNIMPLEMENTED,
                            f"message encoding {encoding.decode('latin-1')!r} is not supported")
        path_text = path.decode("latin-1")
        meta = tuple(metadata)
        handler = self.server.lookup(path_text)
        if handler is None:
            return _Refusal(0, StatusCode.UNIMPLEMENTED, f"Method not found: {path_text}")
        try:
            seconds = None if timeout is None else parse_timeout(timeout.decode("latin-1"))
        except RequestError as exc:
            return _Refusal(0, exc.code, str(exc))
        return _Request(path_text, handler, meta, seconds)

    def _answer_status(self, stream_id: int, code: StatusCode, message: str,
                       end_stream: bool) -> None:
        log.info("rpc refused", stream=stream_id, code=code.name, error=message)
        self._answer(stream_id, trailers_only(code, message), end_stream)

    def _answer_http(self, stream_id: int, status: int, end_stream: bool) -> None:
        log.info("http request refused", stream=stream_id, status=status)
        self._answer(stream_id, frames.http_status(status), end_stream)

    def _answer(self, stream_id: int, block: bytes, end_stream: bool) -> None:
        out = frames.frame(frames.HEADERS, frames.END_HEADERS | frames.END_STREAM,
                           stream_id, block)
        if not end_stream:
            out += frames.rst_stream(stream_id, frames.NO_ERROR)
        self.write(out)

    def _on_rst(self, stream_id: int, payload: memoryview) -> None:
        if len(payload) != 4:
            raise ProtocolError(frames.FRAME_SIZE_ERROR, "RST_STREAM of wrong size")
        if stream_id == 0:
            raise ProtocolError(frames.PROTOCOL_ERROR, "RST_STREAM on stream 0")
        call = self.calls.get(stream_id)
        if call is not None:
            call.cancel("client")
            self._window_changed.set()

    def _on_settings(self, stream_id: int, flags: int, payload: memoryview) -> None:
        if stream_id != 0:
            raise ProtocolError(frames.PROTOCOL_ERROR, "SETTINGS on a stream")
        if flags & frames.ACK:
            if payload:
                raise ProtocolError(frames.FRAME_SIZE_ERROR, "SETTINGS ack with a payload")
            return
        for key, value in frames.parse_settings(bytes(payload)):
            if key == frames.INITIAL_WINDOW_SIZE:
                if value > frames.MAX_WINDOW:
                    raise ProtocolError(frames.FLOW_CONTROL_ERROR, "initial window too large")
                delta = value - self.peer_initial_window
                self.peer_initial_window = value
                for call in self.calls.values():
                    call.send_window += delta
                self._window_changed.set()
            elif key == frames.MAX_FRAME_SIZE:
                if not frames.DEFAULT_MAX_FRAME <= value <= frames.MAX_FRAME_LIMIT:
                    raise ProtocolError(frames.PROTOCOL_ERROR, f"max frame size {value}")
                self.peer_max_frame = value
            elif key == frames.ENABLE_PUSH and value > 1:
                raise ProtocolError(frames.PROTOCOL_ERROR, "ENABLE_PUSH must be 0 or 1")
        self.write(frames.frame(frames.SETTINGS, frames.ACK, 0))

    def _on_ping(self, stream_id: int, flags: int, payload: memoryview) -> None:
        if len(payload) != 8:
            raise ProtocolError(frames.FRAME_SIZE_ERROR, "PING of wrong size")
        if stream_id != 0:
            raise ProtocolError(frames.PROTOCOL_ERROR, "PING on a stream")
        if not flags & frames.ACK:
            self.write(frames.frame(frames.PING, frames.ACK, 0, bytes(payload)))

    def _on_window_update(self, stream_id: int, payload: memoryview) -> None:
        if len(payload) != 4:
            raise ProtocolError(frames.FRAME_SIZE_ERROR, "WINDOW_UPDATE of wrong size")
        increment = frames.u32(payload) & 0x7FFFFFFF
        if stream_id == 0:
            if increment == 0:
                raise ProtocolError(frames.PROTOCOL_ERROR, "zero WINDOW_UPDATE")
            self.send_window += increment
            if self.send_window > frames.MAX_WINDOW:
                raise ProtocolError(frames.FLOW_CONTROL_ERROR, "connection window overflow")
        else:
            call = self.calls.get(stream_id)
            if call is None:
                return
            call.send_window += increment
            if increment == 0 or call.send_window > frames.MAX_WINDOW:
                self._reset(call, frames.FLOW_CONTROL_ERROR)
                return
        self._window_changed.set()

    def _reset(self, call: Call, code: int) -> None:
        self.write(frames.rst_stream(call.stream_id, code))
        call.cancel("client")

    def _abort(self, code: int, message: str) -> None:
        log.warning("http2 connection error", code=code, error=message)
        self.write(frames.goaway(self.last_stream_id, code, message.encode()[:256]))
        self.close()

    # ------------------------------------------------------------- writing

    async def send_data(self, call: Call, payload: bytes, prefix: bytes = b"",
                        suffix: bytes = b"") -> None:
        """``prefix``, then ``payload`` as DATA frames within the flow-control windows,
        then ``suffix`` (the trailers); as one write whenever the windows allow."""
        view = memoryview(payload)
        total = len(payload)
        offset = 0
        out = [prefix] if prefix else []
        stream_id = call.stream_id
        while offset < total:
            if call.closed or self.closed:
                return
            room = min(self.send_window, call.send_window, self.peer_max_frame, total - offset)
            if room <= 0:
                if out:
                    self.write(b"".join(out))
                    out = []
                self._window_changed.clear()
                await self._window_changed.wait()
                continue
            out.append(frames.frame(frames.DATA, 0, stream_id, view[offset:offset + room]))
            self.send_window -= room
            call.send_window -= room
            offset += room
        if suffix:
            out.append(suffix)
        self.write(b"".join(out))
        if suffix:
            call.mark_sent()
        if not self._writable.is_set():
            await self._writable.wait()

    # ------------------------------------------------------------ lifecycle

    def call_finished(self, call: Call) -> None:
        self.calls.pop(call.stream_id, None)
        if self._going_away and not self.calls:
            self.close()

    def go_away(self) -> None:
        """No new calls; close once the ones in flight are done."""
        if self._going_away:
            return
        self._going_away = True
        self.write(frames.goaway(self.last_stream_id, frames.NO_ERROR))
        if not self.calls:
            self.close()
