"""The HTTP side of CRI streaming: one-time URLs, and the upgrade to WebSocket or SPDY.

Exec and PortForward answer with ``http://<address>:<port>/<kind>/<token>``; kubelet
proxies the client's upgrade request there. A token is good for one connection within a
minute, as kubelet's own streaming server has it, so a URL leaked in a log is worthless
soon after. The request's options come from the CRI call that made the token, never
from the URL a client sends.
"""
from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import structlog

from . import spdy, websocket
from .streams import V4, CommandStreams, Options

log = structlog.get_logger()

TOKEN_TTL = 60.0
MAX_PENDING = 1000
MAX_HEADER = 16 * 1024
HEADER_TIMEOUT = 10.0


@dataclass(frozen=True)
class ExecTarget:
    container_id: str
    cmd: tuple[str, ...]
    options: Options


@dataclass(frozen=True)
class AttachTarget:
    container_id: str
    options: Options


@dataclass(frozen=True)
class PortForwardTarget:
    sandbox_id: str


ExecHandler = Callable[[ExecTarget | AttachTarget, CommandStreams], Awaitable[None]]
Connect = Callable[[str, int], Awaitable[tuple[asyncio.StreamReader, asyncio.StreamWriter]]]


@dataclass
class _Pending:
    target: ExecTarget | AttachTarget | PortForwardTarget
    expires: float


class StreamServer:
    def __init__(self, address: str, port: int, run_exec: ExecHandler,
                 connect: Connect) -> None:
        self.address = address
        self.port = port
        self.run_exec = run_exec
        self.connect = connect  # (sandbox id, port) -> a connection inside the pod
        self._pending: dict[str, _Pending] = {}
        self._server: asyncio.Server | None = None
        self._sessions: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, self.address, self.port,
                                                  limit=MAX_HEADER)
        self.port = self._server.sockets[0].getsockname()[1]
        log.info("cri streaming server listening", address=self.address, port=self.port)

    async def aclose(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._sessions):
            task.cancel()
        await asyncio.gather(*self._sessions, return_exceptions=True)

    def url(self, target: ExecTarget | AttachTarget | PortForwardTarget) -> str:
        """A one-time URL for ``target``."""
        now = time.monotonic()
        self._pending = {k: v for k, v in self._pending.items() if v.expires > now}
        if len(self._pending) >= MAX_PENDING:
            # Drop the oldest rather than refuse: an unused token is the likeliest waste.
            oldest = min(self._pending, key=lambda k: self._pending[k].expires)
            del self._pending[oldest]
        token = secrets.token_urlsafe(12)
        self._pending[token] = _Pending(target, now + TOKEN_TTL)
        kind = _KINDS[type(target)]
        host = f"[{self.address}]" if ":" in self.address else self.address
        return f"http://{host}:{self.port}/{kind}/{token}"

    def _take(self, kind: str,
              token: str) -> ExecTarget | AttachTarget | PortForwardTarget | None:
        pending = self._pending.pop(token, None)
        if pending is None or pending.expires < time.monotonic():
            return None
        return pending.target if _KINDS[type(pending.target)] == kind else None

    # -- one connection ------------------------------------------------------------------

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._sessions.add(task)
        try:
            await self._handle(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError, TimeoutError):
            pass
        except Exception as exc:  # noqa: BLE001 - one broken session must not stop the server
            log.error("cri streaming session failed", error=str(exc) or type(exc).__name__)
        finally:
            self._sessions.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), HEADER_TIMEOUT)
        except (asyncio.LimitOverrunError, ValueError):
            return await _reply(writer, 431, "request header too large")
        method, path, headers = _parse(head)
        if method not in ("GET", "POST"):
            return await _reply(writer, 405, "method not allowed")
        parts = path.split("?", 1)[0].strip("/").split("/")
        if len(parts) != 2 or parts[0] not in _KINDS.values():
            return await _reply(writer, 404, "not found")
        target = self._take(parts[0], parts[1])
        if target is None:
            return await _reply(writer, 404, "unknown or expired streaming token")
        upgrade = headers.get("upgrade", "").lower()
        if isinstance(target, PortForwardTarget):
            await self._portforward(reader, writer, headers, upgrade, target)
        else:
            await self._command(reader, writer, headers, upgrade, target)

    async def _command(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                       headers: dict[str, str], upgrade: str,
                       target: ExecTarget | AttachTarget) -> None:
        async def handler(streams: CommandStreams) -> None:
            await self.run_exec(target, streams)

        if upgrade == "websocket":
            protocol = websocket.choose_protocol(headers.get("sec-websocket-protocol", ""))
            key = headers.get("sec-websocket-key", "")
            if protocol is None or not key:
                return await _reply(writer, 400, "unsupported websocket subprotocol")
            await _switch(writer, {"Upgrade": "websocket",
                                   "Sec-WebSocket-Accept": websocket.accept_key(key),
                                   "Sec-WebSocket-Protocol": protocol})
            await websocket.serve_command(reader, writer, target.options, protocol, handler)
        elif upgrade.startswith("spdy/3.1"):
            offered = [v.strip() for v in headers.get("x-stream-protocol-version", "").split(",")]
            if V4 not in offered:
                return await _reply(writer, 403, "remotecommand protocol v4 is required")
            await _switch(writer, {"Upgrade": "SPDY/3.1", "X-Stream-Protocol-Version": V4})
            await spdy.serve_command(reader, writer, target.options, V4, handler)
        else:
            await _reply(writer, 400, "expected an upgrade to websocket or SPDY/3.1")

    async def _portforward(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                           headers: dict[str, str], upgrade: str,
                           target: PortForwardTarget) -> None:
        if not upgrade.startswith("spdy/3.1"):
            return await _reply(writer, 400, "port forwarding needs an upgrade to SPDY/3.1")
        await _switch(writer, {"Upgrade": "SPDY/3.1",
                               "X-Stream-Protocol-Version": "portforward.k8s.io"})

        async def connect(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
            return await self.connect(target.sandbox_id, port)

        await spdy.serve_portforward(reader, writer, connect)


_KINDS = {ExecTarget: "exec", AttachTarget: "attach", PortForwardTarget: "portforward"}


def _parse(head: bytes) -> tuple[str, str, dict[str, str]]:
    lines = head.decode("latin-1").split("\r\n")
    method, _, rest = lines[0].partition(" ")
    path = rest.rsplit(" ", 1)[0]
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if sep:
            key = name.strip().lower()
            # Repeated headers (several protocol versions offered) join as HTTP says.
            headers[key] = f"{headers[key]}, {value.strip()}" if key in headers \
                else value.strip()
    return method, path, headers


async def _switch(writer: asyncio.StreamWriter, headers: dict[str, str]) -> None:
    lines = ["HTTP/1.1 101 Switching Protocols", "Connection: Upgrade",
             *(f"{k}: {v}" for k, v in headers.items())]
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
    await writer.drain()


async def _reply(writer: asyncio.StreamWriter, code: int, message: str) -> None:
    reasons = {400: "Bad Request", 403: "Forbidden", 404: "Not Found",
               405: "Method Not Allowed", 431: "Request Header Fields Too Large"}
    body = (message + "\n").encode()
    writer.write(f"HTTP/1.1 {code} {reasons.get(code, 'Error')}\r\nContent-Type: text/plain\r\n"
                 f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode() + body)
    await writer.drain()
