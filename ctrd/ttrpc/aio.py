"""ttrpc client and server for asyncio (the daemon's flavour).

The daemon calls shims through ``Client`` and serves the events endpoint that shims
forward to through ``Server``. Handlers may be plain functions or coroutines taking
``(CallContext, payload_bytes)`` and returning bytes; ``codec.typed`` and
``register_impl`` adapt protobuf-typed methods.
"""
from __future__ import annotations

import asyncio
import contextlib
import inspect
import os
import socket
import stat
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import structlog
from google.protobuf.message import Message

from ctrd import errors
from ctrd.ttrpc import codec, framing
from ctrd.ttrpc.addr import peer_is_same_user, socket_path
from ctrd.ttrpc.codec import ClosedError, Handler, Metadata

M = TypeVar("M", bound=Message)
RECV_SIZE = 1 << 16
log = structlog.get_logger()


class Client:
    """One connection to a ttrpc server; calls may run concurrently."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        on_close: Callable[[], None] | None = None,
    ) -> None:
        self._reader = reader
        self._writer = writer
        self._on_close = on_close
        self._next_id = 1
        self._pending: dict[int, asyncio.Future[framing.Frame]] = {}
        self._closed = False
        self._read_task = asyncio.get_running_loop().create_task(self._read_loop())

    @classmethod
    async def connect(
        cls,
        address: str,
        timeout: float | None = 10.0,
        on_close: Callable[[], None] | None = None,
    ) -> Client:
        """Connect to ``unix:///path``, a bare path or an abstract ``@name``.

        ``on_close`` runs once when the connection ends, whoever ends it (the daemon
        uses it to notice a shim that died).
        """
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_unix_connection(
                socket_path(address), limit=framing.MAX_MESSAGE + framing.HEADER_SIZE
            )
        return cls(reader, writer, on_close)

    @property
    def closed(self) -> bool:
        return self._closed

    async def call(
        self,
        service: str,
        method: str,
        request: Message,
        response_cls: type[M],
        timeout: float | None = None,
        metadata: Metadata | None = None,
    ) -> M:
        payload = await self.call_raw(
            service, method, request.SerializeToString(), timeout=timeout, metadata=metadata
        )
        return response_cls.FromString(payload)

    async def call_raw(
        self,
        service: str,
        method: str,
        payload: bytes,
        timeout: float | None = None,
        metadata: Metadata | None = None,
    ) -> bytes:
        if self._closed:
            raise ClosedError("ttrpc: closed")
        data = codec.encode_request(service, method, payload, timeout, metadata)
        stream_id = self._next_id
        self._next_id += 2  # client streams are odd
        fut: asyncio.Future[framing.Frame] = asyncio.get_running_loop().create_future()
        self._pending[stream_id] = fut
        try:
            self._writer.write(framing.encode(stream_id, framing.TYPE_REQUEST, data))
            async with asyncio.timeout(timeout):
                await self._writer.drain()
                response = await fut
        except TimeoutError:
            raise errors.DeadlineExceeded(
                f"ttrpc: {service}/{method} timed out after {timeout}s"
            ) from None
        except (ConnectionError, OSError) as exc:
            raise ClosedError(f"ttrpc: send failed: {exc}") from None
        finally:
            self._pending.pop(stream_id, None)
        return codec.decode_response_frame(response)

    async def close(self) -> None:
        self._closed = True
        self._writer.close()
        with contextlib.suppress(Exception):
            await self._writer.wait_closed()
        with contextlib.suppress(asyncio.CancelledError):
            await self._read_task

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _read_loop(self) -> None:
        decoder = framing.Decoder()
        try:
            while True:
                data = await self._reader.read(RECV_SIZE)
                if not data:
                    break
                for frame in decoder.feed(data):
                    fut = self._pending.pop(frame.stream_id, None)
                    if fut is not None and not fut.done():  # else the call gave up waiting
                        fut.set_result(frame)
        except (ConnectionError, OSError):
            pass
        finally:
            self._closed = True
            pending, self._pending = self._pending, {}
            for fut in pending.values():
                if not fut.done():
                    fut.set_exception(ClosedError("ttrpc: closed"))
            self._writer.close()
            if self._on_close is not None:
                try:
                    self._on_close()
                except Exception:
                    log.exception("ttrpc_on_close_failed")


class Server:
    def __init__(self, require_same_user: bool = True) -> None:
        self.registry = codec.Registry()
        self._require_same_user = require_same_user
        self._servers: list[asyncio.base_events.Server] = []
        self._conns: set[asyncio.Task[None]] = set()
        self._paths: list[str] = []

    def register(self, service: str, methods: Mapping[str, Handler]) -> None:
        self.registry.register(service, methods)

    def register_impl(self, descriptor: Any, impl: object) -> None:
        self.registry.register_impl(descriptor, impl)

    async def listen(self, address: str, mode: int = 0o600) -> None:
        """Serve on a unix socket path, replacing a stale socket left by a dead process."""
        path = socket_path(address)
        if not path.startswith("\0"):
            with contextlib.suppress(FileNotFoundError):
                if stat.S_ISSOCK(os.lstat(path).st_mode):
                    os.unlink(path)
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(path)
        if not path.startswith("\0"):
            os.chmod(path, mode)
            self._paths.append(path)
        await self.serve_socket(sock)

    async def serve_socket(self, sock: socket.socket) -> None:
        """Serve on an already bound (listening or not) unix socket."""
        server = await asyncio.start_unix_server(
            self._on_connection, sock=sock, limit=framing.MAX_MESSAGE + framing.HEADER_SIZE
        )
        self._servers.append(server)

    async def close(self) -> None:
        for server in self._servers:
            server.close()
        for task in list(self._conns):
            task.cancel()
        for server in self._servers:
            with contextlib.suppress(Exception):
                await server.wait_closed()
        if self._conns:
            await asyncio.gather(*self._conns, return_exceptions=True)
        self._servers.clear()
        for path in self._paths:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        self._paths.clear()

    async def _on_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        sock = writer.get_extra_info("socket")
        if self._require_same_user and sock is not None and not peer_is_same_user(sock):
            writer.close()
            return
        task = asyncio.current_task()
        assert task is not None
        self._conns.add(task)
        handlers: set[asyncio.Task[None]] = set()
        decoder = framing.Decoder()
        try:
            while True:
                data = await reader.read(RECV_SIZE)
                if not data:
                    break
                for frame in decoder.feed(data):
                    refusal = codec.screen_request(frame)
                    if refusal:
                        self._send(writer, frame.stream_id, refusal)
                    elif refusal is None:
                        assert frame.payload is not None
                        h = asyncio.create_task(self._handle(writer, frame.stream_id, frame.payload))
                        handlers.add(h)
                        h.add_done_callback(handlers.discard)
        except (ConnectionError, OSError, asyncio.CancelledError):
            pass
        finally:
            for h in list(handlers):
                h.cancel()
            writer.close()
            self._conns.discard(task)

    async def _handle(self, writer: asyncio.StreamWriter, stream_id: int, data: bytes) -> None:
        try:
            ctx, handler, payload = self.registry.lookup(data)
            async with asyncio.timeout(ctx.timeout):
                result = handler(ctx, payload)
                if inspect.isawaitable(result):
                    result = await result
            response = codec.result_response(ctx, result)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # every failure becomes a status for the caller
            if not isinstance(exc, errors.CtrdError):
                log.exception("ttrpc_handler_failed", stream_id=stream_id)
            response = codec.encode_response(exc=exc)
        self._send(writer, stream_id, response)
        with contextlib.suppress(ConnectionError, OSError):
            await writer.drain()

    @staticmethod
    def _send(writer: asyncio.StreamWriter, stream_id: int, data: bytes) -> None:
        if not writer.is_closing():
            writer.write(codec.response_frame(stream_id, data))
