"""Remote commands over WebSocket (RFC 6455), with Kubernetes' channel subprotocols.

Every binary message starts with a channel byte: 0 stdin, 1 stdout, 2 stderr, 3 the
error (status) channel, 4 resize. ``v5.channel.k8s.io`` adds a close signal, channel
255 followed by the channel being closed, so a client can end stdin without ending the
connection. kubectl 1.30 and later speak v5 to exec.
"""
from __future__ import annotations

import asyncio
import base64
import hashlib
import struct
from collections.abc import AsyncIterator, Awaitable, Callable

import structlog

from .streams import V4, V5, CommandStreams, Options, parse_resize

log = structlog.get_logger()

_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
# Subprotocols served, best first: v4 and later carry the status as metav1.Status JSON.
PROTOCOLS = (V5, V4)
MAX_MESSAGE = 16 << 20

STDIN, STDOUT, STDERR, ERROR, RESIZE, CLOSE = 0, 1, 2, 3, 4, 255
_CONT, _TEXT, _BINARY, _CLOSE, _PING, _PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA


class ProtocolError(Exception):
    """The peer broke RFC 6455; the connection is closed with ``code``."""

    def __init__(self, message: str, code: int = 1002) -> None:
        super().__init__(message)
        self.code = code


def accept_key(key: str) -> str:
    """Sec-WebSocket-Accept for a client's Sec-WebSocket-Key."""
    return base64.b64encode(hashlib.sha1(key.encode() + _GUID).digest()).decode()


def choose_protocol(offered: str) -> str | None:
    """The subprotocol to answer a Sec-WebSocket-Protocol offer with, if any fits."""
    offers = [p.strip() for p in offered.split(",") if p.strip()]
    return next((p for p in PROTOCOLS if p in offers), None)


def encode_frame(opcode: int, payload: bytes) -> bytes:
    """One unmasked, final frame (servers never mask)."""
    length = len(payload)
    if length < 126:
        header = struct.pack("!BB", 0x80 | opcode, length)
    elif length < 1 << 16:
        header = struct.pack("!BBH", 0x80 | opcode, 126, length)
    else:
        header = struct.pack("!BBQ", 0x80 | opcode, 127, length)
    return header + payload


async def read_frame(reader: asyncio.StreamReader) -> tuple[bool, int, bytes]:
    """(final, opcode, unmasked payload) of the client's next frame."""
    first, second = await reader.readexactly(2)
    if first & 0x70:
        raise ProtocolError("reserved bits set")
    masked, length = second & 0x80, second & 0x7F
    if length == 126:
        (length,) = struct.unpack("!H", await reader.readexactly(2))
    elif length == 127:
        (length,) = struct.unpack("!Q", await reader.readexactly(8))
    if not masked:
        raise ProtocolError("client frames must be masked")
    if length > MAX_MESSAGE:
        raise ProtocolError(f"frame of {length} bytes is too large", 1009)
    mask = await reader.readexactly(4)
    data = await reader.readexactly(length)
    # XOR with the repeated 4-byte key, done on whole integers rather than per byte.
    key = int.from_bytes((mask * (length // 4 + 1))[:length], "big")
    payload = (int.from_bytes(data, "big") ^ key).to_bytes(length, "big") if length else b""
    return bool(first & 0x80), first & 0x0F, payload


class _Session:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.closed = False
        self._lock = asyncio.Lock()

    async def send(self, opcode: int, payload: bytes) -> None:
        if self.closed:
            return  # the client is gone: output has nowhere to go
        async with self._lock:
            try:
                self.writer.write(encode_frame(opcode, payload))
                await self.writer.drain()
            except (ConnectionError, RuntimeError):
                self.closed = True

    async def channel(self, number: int, data: bytes) -> None:
        await self.send(_BINARY, bytes([number]) + data)

    async def messages(self) -> AsyncIterator[bytes]:
        """The client's data messages; control frames are answered on the way."""
        parts: list[bytes] = []
        size = 0
        while True:
            final, opcode, payload = await read_frame(self.reader)
            if opcode == _PING:
                await self.send(_PONG, payload)
                continue
            if opcode == _PONG:
                continue
            if opcode == _CLOSE:
                await self.send(_CLOSE, payload[:2])
                return
            if opcode not in (_CONT, _TEXT, _BINARY) or (opcode == _CONT) != bool(parts):
                raise ProtocolError(f"unexpected opcode {opcode}")
            parts.append(payload)
            size += len(payload)
            if size > MAX_MESSAGE:
                raise ProtocolError("message too large", 1009)
            if final:
                yield b"".join(parts)
                parts, size = [], 0

    async def close(self, code: int = 1000) -> None:
        await self.send(_CLOSE, struct.pack("!H", code))
        self.closed = True
        self.writer.close()


async def serve_command(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                        options: Options, version: str,
                        handler: Callable[[CommandStreams], Awaitable[None]]) -> None:
    """Run ``handler`` with the streams of an upgraded WebSocket connection."""
    session = _Session(reader, writer)

    async def out(number: int, data: bytes) -> None:
        await session.channel(number, data)

    streams = CommandStreams(
        options, version,
        write_stdout=lambda data: out(STDOUT, data),
        write_stderr=lambda data: out(STDERR, data),
        send_status=lambda data: out(ERROR, data),
        stdin=asyncio.StreamReader() if options.stdin else None)
    receiving = asyncio.create_task(_receive(session, streams))
    try:
        await handler(streams)
    finally:
        receiving.cancel()
        await asyncio.gather(receiving, return_exceptions=True)
        await session.close()


async def _receive(session: _Session, streams: CommandStreams) -> None:
    code = 1000
    try:
        async for message in session.messages():
            if not message:
                continue
            number, data = message[0], message[1:]
            if number == STDIN and streams.stdin is not None and not streams.stdin.at_eof():
                streams.stdin.feed_data(data)
            elif number == RESIZE:
                size = parse_resize(data)
                if size is not None:
                    streams.resizes.put_nowait(size)
            elif (number == CLOSE and streams.version == V5 and data[:1] == bytes([STDIN])
                  and streams.stdin is not None):
                streams.stdin.feed_eof()
    except ProtocolError as exc:
        log.warning("websocket protocol error", error=str(exc))
        code = exc.code
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        if streams.stdin is not None:
            streams.stdin.feed_eof()
        streams.disconnected.set()
        if code != 1000:
            await session.close(code)
