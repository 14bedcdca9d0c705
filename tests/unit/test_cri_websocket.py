"""The WebSocket side of CRI streaming, over a real socket pair: channels, control
frames, fragmentation, and what a hostile client gets."""
from __future__ import annotations

import asyncio
import json
import os
import socket
import struct

import pytest
from ctrd.daemon.cri.streaming import websocket
from ctrd.daemon.cri.streaming.streams import V4, V5, CommandStreams, Options


def _frame(opcode: int, payload: bytes, *, final: bool = True, mask: bool = True,
           rsv: int = 0, length: int | None = None) -> bytes:
    first = (0x80 if final else 0) | rsv | opcode
    size = len(payload) if length is None else length
    if size < 126:
        header = struct.pack("!BB", first, (0x80 if mask else 0) | size)
    elif size < 1 << 16:
        header = struct.pack("!BBH", first, (0x80 if mask else 0) | 126, size)
    else:
        header = struct.pack("!BBQ", first, (0x80 if mask else 0) | 127, size)
    if not mask:
        return header + payload
    key = os.urandom(4)
    return header + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


async def _read_frames(reader: asyncio.StreamReader) -> list[tuple[int, bytes]]:
    frames = []
    try:
        while True:
            first, second = await asyncio.wait_for(reader.readexactly(2), 5)
            length = second & 0x7F
            if length == 126:
                (length,) = struct.unpack("!H", await reader.readexactly(2))
            elif length == 127:
                (length,) = struct.unpack("!Q", await reader.readexactly(8))
            frames.append((first & 0x0F, await reader.readexactly(length)))
            if first & 0x0F == 0x8:
                return frames
    except asyncio.IncompleteReadError:
        return frames


async def _session(client_bytes: bytes, version: str = V5, *, stdin: bool = True,
                   handler=None) -> tuple[list[tuple[int, bytes]], CommandStreams]:
    """Serve one command on a socket pair; the client sends ``client_bytes`` and then
    reads everything the server sends until it closes."""
    ours, theirs = socket.socketpair()
    server_reader, server_writer = await asyncio.open_unix_connection(sock=ours)
    client_reader, client_writer = await asyncio.open_unix_connection(sock=theirs)
    seen: list[CommandStreams] = []

    async def default(streams: CommandStreams) -> None:
        seen.append(streams)
        data = await streams.stdin.read() if streams.stdin else b""
        await streams.write_stdout(data.upper())
        await streams.finish(0)

    async def wrapped(streams: CommandStreams) -> None:
        seen.append(streams)
        await (handler or default)(streams)

    serving = asyncio.create_task(websocket.serve_command(
        server_reader, server_writer, Options(stdin=stdin, stdout=True), version, wrapped))
    client_writer.write(client_bytes)
    await client_writer.drain()
    frames = await _read_frames(client_reader)
    await asyncio.wait_for(serving, 5)
    client_writer.close()
    return frames, seen[0]


def _data(frames: list[tuple[int, bytes]]) -> dict[int, bytes]:
    out: dict[int, bytes] = {}
    for opcode, payload in frames:
        if opcode == 0x2 and payload:
            out[payload[0]] = out.get(payload[0], b"") + payload[1:]
    return out


def test_handshake_helpers() -> None:
    # RFC 6455's own example key.
    assert websocket.accept_key("dGhlIHNhbXBsZSBub25jZQ==") == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
    assert websocket.choose_protocol("v4.channel.k8s.io, v5.channel.k8s.io") == V5
    assert websocket.choose_protocol("channel.k8s.io,v4.channel.k8s.io") == V4
    assert websocket.choose_protocol("base64.channel.k8s.io") is None
    assert websocket.choose_protocol("") is None


async def test_stdin_fragments_ping_and_close_signal() -> None:
    frames, _ = await _session(
        _frame(0x9, b"are you there")
        + _frame(0x2, b"\x00hel", final=False) + _frame(0x0, b"lo ", final=False)
        + _frame(0x0, b"world")
        + _frame(0x2, b"")  # empty messages are ignored
        + _frame(0x2, bytes([255, 0])))  # v5: stdin ends
    assert (0xA, b"are you there") in frames
    assert _data(frames)[1] == b"HELLO WORLD"
    assert json.loads(_data(frames)[3]) == {"metadata": {}, "status": "Success"}
    assert frames[-1][0] == 0x8


async def test_resize_messages_reach_the_queue_and_junk_is_dropped() -> None:
    async def handler(streams: CommandStreams) -> None:
        size = await asyncio.wait_for(streams.resizes.get(), 5)
        await streams.write_stdout(f"{size[0]}x{size[1]}".encode())
        await streams.finish(0)

    frames, streams = await _session(
        _frame(0x2, b"\x04not json") + _frame(0x2, b'\x04{"Width": 0, "Height": 5}')
        + _frame(0x2, b'\x04{"Width": 80, "Height": 24}'), stdin=False, handler=handler)
    assert _data(frames)[1] == b"80x24"
    assert streams.resizes.empty()


async def test_v4_ignores_the_close_signal() -> None:
    async def handler(streams: CommandStreams) -> None:
        assert streams.stdin is not None
        await asyncio.sleep(0.2)
        await streams.write_stdout(b"eof" if streams.stdin.at_eof() else b"open")
        await streams.finish(0)

    frames, _ = await _session(_frame(0x2, bytes([255, 0])), V4, handler=handler)
    assert _data(frames)[1] == b"open"


@pytest.mark.parametrize(("client_bytes", "code"), [
    (_frame(0x2, b"\x00unmasked", mask=False), 1002),
    (_frame(0x2, b"\x00x", rsv=0x40), 1002),
    (_frame(0x3, b"\x00x"), 1002),  # a reserved opcode
    (_frame(0x0, b"\x00continuation of nothing"), 1002),
    (_frame(0x2, b"", length=websocket.MAX_MESSAGE + 1), 1009),
])
async def test_hostile_frames_close_the_session(client_bytes: bytes, code: int) -> None:
    async def handler(streams: CommandStreams) -> None:
        # The command sees stdin end and the client gone.
        await asyncio.wait_for(streams.disconnected.wait(), 5)
        assert streams.stdin is not None and streams.stdin.at_eof()
        await streams.write_stdout(b"ignored")

    frames, _ = await _session(client_bytes, handler=handler)
    closes = [payload for opcode, payload in frames if opcode == 0x8]
    assert closes and struct.unpack("!H", closes[0][:2])[0] == code
    assert 1 not in _data(frames)  # nothing is written after the session broke


async def test_client_vanishing_mid_command() -> None:
    async def handler(streams: CommandStreams) -> None:
        await asyncio.wait_for(streams.disconnected.wait(), 5)
        await streams.write_stdout(b"nobody listens")  # must not raise
        await streams.finish(1)

    ours, theirs = socket.socketpair()
    reader, writer = await asyncio.open_unix_connection(sock=ours)
    serving = asyncio.create_task(websocket.serve_command(
        reader, writer, Options(stdin=True, stdout=True), V5, handler))
    theirs.sendall(_frame(0x2, b"\x00half a li"))
    theirs.close()
    await asyncio.wait_for(serving, 5)
