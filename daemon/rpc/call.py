"""One gRPC call: the HTTP/2 stream it arrived on and the handler that serves it.

A :class:`Call` is also the servicer context handed to the handler, with the part of
``grpc.aio.ServicerContext`` that ctrd's services use (``invocation_metadata``,
``read``, ``write``, ``abort``, ``add_done_callback``), so services are written as for
grpcio.

A unary request is only handed to its handler once the client has ended its side of
the stream, so a unary call costs one task and no waiting; a streaming request starts
its handler at once and feeds it messages as they arrive.
"""
from __future__ import annotations

import asyncio
import inspect
from collections import deque
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any, NamedTuple

import structlog

from . import frames
from .handlers import MethodHandler
from .status import EOF, AbortError, StatusCode, code_number

if TYPE_CHECKING:
    from .connection import Connection

log = structlog.get_logger()

OK = StatusCode.OK
_TIMEOUT_UNITS = {"H": 3600.0, "M": 60.0, "S": 1.0, "m": 1e-3, "u": 1e-6, "n": 1e-9}
_MESSAGE_PREFIX = 5  # compressed flag + 4-byte length


class Metadatum(NamedTuple):
    key: str
    value: str | bytes


class RequestError(Exception):
    """The request itself is unusable; the call ends with ``code``."""

    def __init__(self, code: StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


def parse_timeout(value: str) -> float:
    """Seconds from a ``grpc-timeout`` value: at most 8 digits and a unit letter."""
    digits, unit = value[:-1], value[-1:]
    if not digits.isdigit() or len(digits) > 8 or unit not in _TIMEOUT_UNITS:
        raise RequestError(StatusCode.INTERNAL, f"malformed grpc-timeout {value!r}")
    return int(digits) * _TIMEOUT_UNITS[unit]


def percent_encode(message: str) -> str:
    """grpc-message travels percent-encoded: UTF-8 bytes outside printable ASCII, and '%'."""
    out = []
    for byte in message.encode("utf-8", "replace"):
        if 0x20 <= byte <= 0x7E and byte != 0x25:
            out.append(chr(byte))
        else:
            out.append(f"%{byte:02X}")
    return "".join(out)


def status_block(code: StatusCode, message: str) -> bytes:
    block = frames.literal("grpc-status", str(code_number(code)))
    if message:
        block += frames.literal("grpc-message", percent_encode(message))
    return block


def trailers_only(code: StatusCode, message: str) -> bytes:
    """A whole answer in one header block: the HTTP status with the gRPC one."""
    return frames.RESPONSE_HEADERS + status_block(code, message)


_OK_TRAILERS = status_block(OK, "")


class Call:
    """A gRPC call in progress; the handler's ``context``."""

    __slots__ = (
        "_conn", "stream_id", "path", "_handler", "_metadata", "_timeout",
        "_deadline_timer", "send_window", "unacked", "queued_bytes", "_inbuf", "_messages",
        "_reader", "remote_closed", "_request_error", "_headers_sent", "closed", "_code",
        "_details", "_task", "_cancel_reason", "_callbacks", "_finished")

    def __init__(self, conn: Connection, stream_id: int, path: str,
                 handler: MethodHandler, metadata: tuple[Metadatum, ...],
                 timeout: float | None) -> None:
        self._conn = conn
        self.stream_id = stream_id
        self.path = path
        self._handler = handler
        self._metadata = metadata
        self._timeout = timeout
        self._deadline_timer: asyncio.TimerHandle | None = None
        # Flow control, managed by the connection.
        self.send_window = conn.peer_initial_window
        self.unacked = 0  # bytes received and not yet given back to the client
        self.queued_bytes = 0  # bytes of complete messages the handler has not read
        # Inbound messages.
        self._inbuf = bytearray()
        self._messages: deque[bytes] = deque()
        self._reader: asyncio.Future | None = None
        self.remote_closed = False  # the client ended its side
        self._request_error: RequestError | None = None
        # Outbound state.
        self._headers_sent = False
        self.closed = False  # trailers sent or stream reset: nothing more goes out
        self._code: StatusCode | None = None
        self._details = ""
        self._task: asyncio.Task | None = None
        self._cancel_reason: str = ""  # "client", "deadline", "shutdown", "connection"
        self._callbacks: list[Callable[[Call], None]] = []
        self._finished = False

    # ------------------------------------------------------------ from the peer

    def start(self) -> None:
        if self._timeout is not None:
            self._deadline_timer = self._conn.loop.call_later(
                self._timeout, self.cancel, "deadline")
        if self._handler.request_streaming:
            self._task = self._conn.loop.create_task(self._serve())

    def receive_data(self, data: bytes | memoryview) -> None:
        """Bytes of the request stream (flow control is the connection's business)."""
        if self._request_error is not None:
            return
        inbuf = self._inbuf
        inbuf += data
        limit = self._conn.server.max_receive_message_length
        while len(inbuf) >= _MESSAGE_PREFIX:
            size = int.from_bytes(inbuf[1:5], "big")
            if size > limit:
                self._fail_request(RequestError(
                    StatusCode.RESOURCE_EXHAUSTED,
                    f"received message larger than max ({size} vs. {limit})"))
                return
            if len(inbuf) < _MESSAGE_PREFIX + size:
                break
            if inbuf[0]:
                self._fail_request(RequestError(
                    StatusCode.UNIMPLEMENTED, "compressed messages are not supported"))
                return
            with memoryview(inbuf) as view:  # one copy, and released before the del
                self._messages.append(bytes(view[_MESSAGE_PREFIX:_MESSAGE_PREFIX + size]))
            self.queued_bytes += _MESSAGE_PREFIX + size
            del inbuf[:_MESSAGE_PREFIX + size]
        self._wake_reader()

    def receive_end(self) -> None:
        """The client ended its side: no more request bytes."""
        self.remote_closed = True
        if self._inbuf and self._request_error is None:
            self._fail_request(RequestError(StatusCode.INTERNAL,
                                            "request stream ended inside a message"))
            return
        if self._task is None and not self.closed:
            self._task = self._conn.loop.create_task(self._serve())
        else:
            self._wake_reader()

    def cancel(self, reason: str) -> None:
        """The client reset the stream, the connection went, the deadline passed, or
        the server is stopping: the handler is cancelled."""
        if self._finished or self._cancel_reason:
            return
        self._cancel_reason = reason
        if reason in ("client", "connection"):
            self.closed = True  # nothing may be sent on a reset stream
        if self._task is None:
            # A unary call still waiting for its request: nothing runs yet.
            if reason == "deadline":
                self._send_status(StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded")
            elif reason == "shutdown":
                self._send_status(StatusCode.UNAVAILABLE, "server is shutting down")
            self._finish()
        else:
            self._task.cancel()

    def _fail_request(self, error: RequestError) -> None:
        self._request_error = error
        self._messages.clear()
        self._inbuf.clear()
        if self._task is None:
            self._send_status(error.code, str(error))
            self._finish()
        else:
            self._wake_reader()

    def _wake_reader(self) -> None:
        reader = self._reader
        if reader is not None and not reader.done():
            reader.set_result(None)

    # ------------------------------------------------------- servicer context

    def invocation_metadata(self) -> tuple[Metadatum, ...]:
        return self._metadata

    def add_done_callback(self, callback: Callable[[Call], None]) -> None:
        if self._finished:
            callback(self)
        else:
            self._callbacks.append(callback)

    async def abort(self, code: StatusCode, details: str = "") -> None:
        if code_number(code) == OK:  # ours or a grpc.StatusCode
            raise ValueError("abort needs a status other than OK")
        self._code, self._details = code, details
        raise AbortError()

    async def read(self) -> Any:
        """The next request message, or ``EOF`` once the client is done."""
        while not self._messages:
            if self._request_error is not None:
                await self.abort(self._request_error.code, str(self._request_error))
            if self.remote_closed:
                return EOF
            self._reader = self._conn.loop.create_future()
            try:
                await self._reader
            finally:
                self._reader = None
        raw = self._messages.popleft()
        self.queued_bytes -= _MESSAGE_PREFIX + len(raw)
        self._conn.replenish(self)
        try:
            return self._deserialize(raw)
        except RequestError as exc:
            # As an abort, so that the handler's error mapping lets the status through.
            await self.abort(exc.code, str(exc))

    async def write(self, message: Any) -> None:
        if self.closed:
            raise asyncio.CancelledError()  # the client is gone; stop producing
        await self._conn.send_data(self, self._encode(message), self._headers_once())

    # ------------------------------------------------------------ the handler

    async def _serve(self) -> None:
        handler = self._handler
        try:
            try:
                if handler.request_streaming:
                    argument: Any = self._requests()
                else:
                    argument = self._single_request()
                if handler.response_streaming:
                    behaviour = handler.unary_stream or handler.stream_stream
                    result = behaviour(argument, self)
                    if inspect.isasyncgen(result):
                        async for response in result:
                            await self.write(response)
                    elif inspect.isawaitable(result):
                        await result
                    self._end_ok()
                else:
                    behaviour = handler.unary_unary or handler.stream_unary
                    response = behaviour(argument, self)
                    if inspect.isawaitable(response):
                        response = await response
                    await self._send_unary(response)
            except AbortError:
                self._send_status(self._code or StatusCode.UNKNOWN, self._details)
            except RequestError as exc:
                self._send_status(exc.code, str(exc))
            except asyncio.CancelledError:
                if self._cancel_reason == "deadline":
                    self._send_status(StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded")
                elif self._cancel_reason == "shutdown":
                    self._send_status(StatusCode.UNAVAILABLE, "server is shutting down")
                elif not self._cancel_reason:
                    raise  # not ours: the loop is going away
            except Exception as exc:  # noqa: BLE001 - the call must end with a status
                log.exception("rpc handler failed", method=self.path)
                self._send_status(StatusCode.UNKNOWN, f"Unexpected {type(exc).__name__}: {exc}")
        finally:
            self._finish()

    def _single_request(self) -> Any:
        if self._request_error is not None:
            raise self._request_error
        if len(self._messages) != 1:
            raise RequestError(StatusCode.INTERNAL,
                               f"expected one request message, got {len(self._messages)}")
        raw = self._messages.popleft()
        self.queued_bytes = 0
        return self._deserialize(raw)

    async def _requests(self) -> AsyncIterator[Any]:
        while True:
            message = await self.read()
            if message is EOF:
                return
            yield message

    def _deserialize(self, raw: bytes) -> Any:
        deserializer = self._handler.request_deserializer
        if deserializer is None:
            return raw
        try:
            return deserializer(raw)
        except Exception as exc:  # noqa: BLE001 - any parse failure is the client's
            raise RequestError(StatusCode.INTERNAL,
                               f"could not parse the request message: {exc}") from None

    def _encode(self, message: Any) -> bytes:
        serializer = self._handler.response_serializer
        data = message if serializer is None else serializer(message)
        limit = self._conn.server.max_send_message_length
        if len(data) > limit:
            self._code = StatusCode.RESOURCE_EXHAUSTED
            self._details = f"sent message larger than max ({len(data)} vs. {limit})"
            raise AbortError()
        # The 5-byte prefix: a zero "compressed" flag, then the 4-byte length.
        return len(data).to_bytes(_MESSAGE_PREFIX, "big") + data

    async def _send_unary(self, response: Any) -> None:
        await self._conn.send_data(self, self._encode(response), self._headers_once(),
                                   self._trailers_frame())

    def _headers_once(self) -> bytes:
        """The response's HEADERS frame the first time a message goes out, then nothing."""
        if self._headers_sent:
            return b""
        self._headers_sent = True
        return frames.frame(frames.HEADERS, frames.END_HEADERS, self.stream_id,
                            frames.RESPONSE_HEADERS)

    def _trailers_frame(self) -> bytes:
        return frames.frame(frames.HEADERS, frames.END_HEADERS | frames.END_STREAM,
                            self.stream_id, _OK_TRAILERS)

    def _end_ok(self) -> None:
        if self.closed:
            return
        if not self._headers_sent:
            self._send_status(OK, "")
            return
        self._conn.write(self._trailers_frame())
        self._closed_by_us()

    def _send_status(self, code: StatusCode, message: str) -> None:
        if self.closed:
            return
        if self._headers_sent:
            block = status_block(code, message)
        else:
            block = trailers_only(code, message)
            self._headers_sent = True
        self._conn.write(frames.frame(frames.HEADERS, frames.END_HEADERS | frames.END_STREAM,
                                      self.stream_id, block))
        # After a successful call a client still sending is let be (grpcio's client fails
        # its last writes, and the call with them, on a reset); after a failure it is
        # stopped, since it may be pushing a message too large to ever be read.
        self._closed_by_us(stop_client=code_number(code) != OK)

    def _closed_by_us(self, stop_client: bool = False) -> None:
        self.closed = True
        if stop_client and not self.remote_closed:
            # The client may be blocked sending a request that will never be read.
            self._conn.write(frames.rst_stream(self.stream_id, frames.NO_ERROR))
        # The answer is whole: send it now rather than at the loop's next turn.
        self._conn.flush()

    def mark_sent(self) -> None:
        """The connection wrote the trailers passed to send_data."""
        self._closed_by_us()

    def _finish(self) -> None:
        if self._finished:
            return
        self._finished = True
        if self._deadline_timer is not None:
            self._deadline_timer.cancel()
        self._conn.call_finished(self)
        callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            try:
                callback(self)
            except Exception:  # noqa: BLE001 - one bad callback must not stop the rest
                log.exception("rpc done callback failed", method=self.path)
