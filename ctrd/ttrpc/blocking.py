"""ttrpc client and server on plain sockets and threads (no asyncio).

This is the flavour the shim uses: importing it costs little, and an idle
connection costs one thread blocked in recv(). The server answers every request in
its own thread because some calls (Wait) block for the lifetime of a process.
"""
from __future__ import annotations

import socket
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from google.protobuf.message import Message

from ctrd import errors
from ctrd.ttrpc import codec, framing
from ctrd.ttrpc.addr import peer_is_same_user, socket_path
from ctrd.ttrpc.codec import CallContext, ClosedError, Handler, Metadata

M = TypeVar("M", bound=Message)
RECV_SIZE = 1 << 16


def dial(address: str, timeout: float | None = 10.0) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    sock.settimeout(timeout)
    try:
        sock.connect(socket_path(address))
    except BaseException:
        sock.close()
        raise
    sock.settimeout(None)
    return sock


@dataclass(slots=True)
class _Pending:
    done: threading.Event = field(default_factory=threading.Event)
    frame: framing.Frame | None = None
    error: BaseException | None = None


class Client:
    """One connection; any number of threads may call concurrently."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._lock = threading.Lock()  # guards stream ids, _pending, _closed and sends
        self._next_id = 1
        self._pending: dict[int, _Pending] = {}
        self._closed: BaseException | None = None
        self._reader = threading.Thread(target=self._read_loop, name="ttrpc-client", daemon=True)
        self._reader.start()

    @classmethod
    def connect(cls, address: str, timeout: float | None = 10.0) -> Client:
        return cls(dial(address, timeout))

    @property
    def closed(self) -> bool:
        return self._closed is not None

    def call(
        self,
        service: str,
        method: str,
        request: Message,
        response_cls: type[M],
        timeout: float | None = None,
        metadata: Metadata | None = None,
    ) -> M:
        payload = self.call_raw(
            service, method, request.SerializeToString(), timeout=timeout, metadata=metadata
        )
        return response_cls.FromString(payload)

    def call_raw(
        self,
        service: str,
        method: str,
        payload: bytes,
        timeout: float | None = None,
        metadata: Metadata | None = None,
    ) -> bytes:
        data = codec.encode_request(service, method, payload, timeout, metadata)
        pending = _Pending()
        with self._lock:
            if self._closed is not None:
                raise ClosedError("ttrpc: closed")
            stream_id = self._next_id
            self._next_id += 2  # client streams are odd
            self._pending[stream_id] = pending
            try:
                self._sock.sendall(framing.encode(stream_id, framing.TYPE_REQUEST, data))
            except OSError as exc:
                del self._pending[stream_id]
                raise ClosedError(f"ttrpc: send failed: {exc}") from None
        if not pending.done.wait(timeout):
            with self._lock:
                self._pending.pop(stream_id, None)
            raise errors.DeadlineExceeded(f"ttrpc: {service}/{method} timed out after {timeout}s")
        if pending.error is not None:
            raise pending.error
        assert pending.frame is not None
        return codec.decode_response_frame(pending.frame)

    def close(self) -> None:
        with self._lock:
            if self._closed is None:
                self._closed = ClosedError("ttrpc: closed")
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        if threading.current_thread() is not self._reader:
            self._reader.join()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _read_loop(self) -> None:
        decoder = framing.Decoder()
        try:
            while True:
                data = self._sock.recv(RECV_SIZE)
                if not data:
                    break
                for frame in decoder.feed(data):
                    self._deliver(frame)
        except OSError:
            pass
        finally:
            self._fail_all()
            self._sock.close()

    def _deliver(self, frame: framing.Frame) -> None:
        with self._lock:
            pending = self._pending.pop(frame.stream_id, None)
        if pending is None:
            return  # a call that timed out locally; its late answer has no taker
        pending.frame = frame
        pending.done.set()

    def _fail_all(self) -> None:
        with self._lock:
            if self._closed is None:
                self._closed = ClosedError("ttrpc: closed")
            pending, self._pending = self._pending, {}
        for p in pending.values():
            p.error = ClosedError("ttrpc: closed")
            p.done.set()


class SerialClient:
    """One connection used by one thread, one call at a time: the answer is read by
    the caller itself, so no reader thread waits beside it (the shim's events)."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._next_id = 1
        self._decoder = framing.Decoder()
        self.closed = False

    @classmethod
    def connect(cls, address: str, timeout: float | None = 10.0) -> SerialClient:
        return cls(dial(address, timeout))

    def call_raw(self, service: str, method: str, payload: bytes,
                 timeout: float | None = None, metadata: Metadata | None = None) -> bytes:
        if self.closed:
            raise ClosedError("ttrpc: closed")
        stream_id = self._next_id
        self._next_id += 2  # client streams are odd
        data = codec.encode_request(service, method, payload, timeout, metadata)
        self._sock.settimeout(timeout)
        try:
            self._sock.sendall(framing.encode(stream_id, framing.TYPE_REQUEST, data))
            while True:
                chunk = self._sock.recv(RECV_SIZE)
                if not chunk:
                    raise ClosedError("ttrpc: connection closed by peer")
                for frame in self._decoder.feed(chunk):
                    if frame.stream_id == stream_id:  # others: answers to calls given up on
                        return codec.decode_response_frame(frame)
        except TimeoutError:
            # The answer may still come; the stream is no longer in step with us.
            self.close()
            raise errors.DeadlineExceeded(
                f"ttrpc: {service}/{method} timed out after {timeout}s") from None
        except OSError as exc:
            self.close()
            raise ClosedError(f"ttrpc: {exc}") from None
        except ClosedError:
            self.close()
            raise

    def close(self) -> None:
        self.closed = True
        self._sock.close()


class _Conn:
    def __init__(self, server: Server, sock: socket.socket) -> None:
        self.server = server
        self.sock = sock
        self.write_lock = threading.Lock()
        self.active = 0  # requests being handled, guarded by server._lock

    def send(self, stream_id: int, data: bytes) -> None:
        with self.write_lock:
            try:
                self.sock.sendall(codec.response_frame(stream_id, data))
            except OSError:
                pass  # the reader notices the dead peer and tears the connection down

    def read_loop(self) -> None:
        decoder = framing.Decoder()
        try:
            while True:
                data = self.sock.recv(RECV_SIZE)
                if not data:
                    break
                for frame in decoder.feed(data):
                    self.on_frame(frame)
        except OSError:
            pass
        finally:
            self.server._forget(self)
            self.sock.close()

    def on_frame(self, frame: framing.Frame) -> None:
        refusal = codec.screen_request(frame)
        if refusal is not None:
            if refusal:
                self.send(frame.stream_id, refusal)
            return
        assert frame.payload is not None
        with self.server._lock:
            self.active += 1
        threading.Thread(
            target=self.handle, args=(frame.stream_id, frame.payload), daemon=True
        ).start()

    def handle(self, stream_id: int, data: bytes) -> None:
        try:
            try:
                ctx, handler, payload = self.server.registry.lookup(data)
                response = codec.result_response(ctx, handler(ctx, payload))
            except Exception as exc:  # every failure becomes a status for the caller
                self.server.on_error(exc)
                response = codec.encode_response(exc=exc)
            self.send(stream_id, response)
        finally:
            with self.server._lock:
                self.active -= 1
                self.server._idle.notify_all()


class Server:
    def __init__(self, require_same_user: bool = True) -> None:
        self.registry = codec.Registry()
        self._require_same_user = require_same_user
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._conns: set[_Conn] = set()
        self._listeners: list[socket.socket] = []
        self._closing = False

    def register(self, service: str, methods: Mapping[str, Handler]) -> None:
        self.registry.register(service, methods)

    def register_impl(self, descriptor: Any, impl: object) -> None:
        self.registry.register_impl(descriptor, impl)

    def on_error(self, exc: Exception) -> None:
        """Hook for logging handler failures; the caller always gets the status."""

    def serve(self, listener: socket.socket) -> None:
        """Accept connections until shutdown(); each gets a reader thread."""
        with self._lock:
            if self._closing:
                return
            self._listeners.append(listener)
        while True:
            try:
                sock, _ = listener.accept()
            except OSError:
                if self._closing:
                    return
                raise
            if not self._adopt(sock):
                return

    def accept(self, listener: socket.socket) -> None:
        """Take one pending connection from a non-blocking listener, for a caller
        that waits on the listener itself (the shim's main loop: a thread less)."""
        try:
            sock, _ = listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        self._adopt(sock)

    def _adopt(self, sock: socket.socket) -> bool:
        """Serve ``sock`` on a reader thread; False once the server is closing."""
        sock.setblocking(True)
        if self._require_same_user and not peer_is_same_user(sock):
            sock.close()
            return True
        conn = _Conn(self, sock)
        with self._lock:
            if self._closing:
                sock.close()
                return False
            self._conns.add(conn)
        threading.Thread(target=conn.read_loop, name="ttrpc-conn", daemon=True).start()
        return True

    def serve_in_thread(self, listener: socket.socket) -> threading.Thread:
        thread = threading.Thread(target=self.serve, args=(listener,), name="ttrpc-accept",
                                  daemon=True)
        thread.start()
        return thread

    def shutdown(self, grace: float = 0.0) -> None:
        """Stop accepting, let in-flight requests finish for up to ``grace`` seconds,
        then drop every connection."""
        with self._lock:
            self._closing = True
            listeners, self._listeners = self._listeners, []
        for listener in listeners:
            try:
                listener.shutdown(socket.SHUT_RDWR)  # wakes the thread blocked in accept()
            except OSError:
                pass
            listener.close()
        with self._lock:
            self._idle.wait_for(lambda: all(c.active == 0 for c in self._conns), grace)
            conns = list(self._conns)
        for conn in conns:
            try:
                conn.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def _forget(self, conn: _Conn) -> None:
        with self._lock:
            self._conns.discard(conn)
