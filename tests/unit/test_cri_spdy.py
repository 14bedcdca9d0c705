"""SPDY/3.1 for CRI streaming: the framing layer, remotecommand and portforward served
over real loopback TCP to a small client built on the same framing, flow control both
ways, and hostile input ending the session quickly and cleanly."""
from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import struct
import time
import zlib
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable
from functools import partial

import pytest
from ctrd.daemon.cri.streaming import spdy
from ctrd.daemon.cri.streaming.spdy import (
    DataFrame,
    Framer,
    GoAway,
    HeadersFrame,
    Ping,
    RstStream,
    Settings,
    SynReply,
    SynStream,
    UnknownControl,
    WindowUpdate,
)
from ctrd.daemon.cri.streaming.streams import V2, V4, V5, CommandStreams, Options

Serve = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
Target = tuple[asyncio.StreamReader, asyncio.StreamWriter]


def control(frame_type: int, payload: bytes, *, version: int = 3, flags: int = 0,
            length: int | None = None) -> bytes:
    """A control frame built by hand, so that it can be wrong."""
    size = len(payload) if length is None else length
    return struct.pack("!HHI", 0x8000 | version, frame_type, (flags << 24) | size) + payload


class Client:
    """A SPDY/3.1 client as Kubernetes' spdystream is one: odd stream ids, one framer.

    By default it ignores flow control, as spdystream does. With ``window`` it behaves
    like a strict SPDY/3.1 peer: it announces that initial stream window, grants
    WINDOW_UPDATEs as it consumes, records any DATA beyond what it granted, and keeps
    its own uploads within the server's windows.
    """

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *,
                 window: int | None = None) -> None:
        self.reader, self.writer = reader, writer
        self.framer = Framer()
        self.next_id = 1
        self.data: dict[int, bytearray] = defaultdict(bytearray)
        self.fins: dict[int, asyncio.Event] = defaultdict(asyncio.Event)
        self.replies: dict[int, asyncio.Event] = defaultdict(asyncio.Event)
        self.resets: dict[int, int] = {}
        self.pings: asyncio.Queue[int] = asyncio.Queue()
        self.goaway: GoAway | None = None
        self.got_goaway = asyncio.Event()
        self.window_updates: list[WindowUpdate] = []
        self.eof = asyncio.Event()
        self.strict = window is not None
        self.violations: list[str] = []
        # What we let the server send, and what it sent.
        self.granted: dict[int, int] = defaultdict(lambda: window or 0)
        self.received: dict[int, int] = defaultdict(int)
        self.session_granted = spdy.INITIAL_WINDOW
        self.session_received = 0
        # What the server lets us send.
        self.send_windows: dict[int, int] = defaultdict(lambda: spdy.INITIAL_WINDOW)
        self.session_send_window = spdy.INITIAL_WINDOW
        self.window_changed = asyncio.Event()
        if window is not None:
            self.raw(spdy.encode_settings({spdy.SETTINGS_INITIAL_WINDOW_SIZE: window}))
        self.task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        try:
            while True:
                frame = await self.framer.read(self.reader)
                self._handle(frame)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self.eof.set()
            self.window_changed.set()

    def _handle(self, frame: spdy.Frame) -> None:
        match frame:
            case DataFrame():
                self.data[frame.stream_id] += frame.data
                if self.strict and frame.data:
                    self._account(frame.stream_id, len(frame.data))
                if frame.fin:
                    self.fins[frame.stream_id].set()
            case SynReply():
                self.replies[frame.stream_id].set()
            case RstStream():
                self.resets[frame.stream_id] = frame.status
                self.replies[frame.stream_id].set()
                self.fins[frame.stream_id].set()
            case Ping():
                self.pings.put_nowait(frame.id)
            case GoAway():
                self.goaway = frame
                self.got_goaway.set()
            case WindowUpdate():
                self.window_updates.append(frame)
                if frame.stream_id == 0:
                    self.session_send_window += frame.delta
                else:
                    self.send_windows[frame.stream_id] += frame.delta
                self.window_changed.set()

    def _account(self, stream_id: int, size: int) -> None:
        self.received[stream_id] += size
        self.session_received += size
        if self.received[stream_id] > self.granted[stream_id]:
            self.violations.append(f"stream {stream_id}: {self.received[stream_id]} bytes "
                                   f"for a window of {self.granted[stream_id]}")
        if self.session_received > self.session_granted:
            self.violations.append(f"session: {self.session_received} bytes "
                                   f"for a window of {self.session_granted}")
        # Consume a little later, as a real reader would.
        asyncio.get_running_loop().call_later(0.002, self._grant, stream_id, size)

    def _grant(self, stream_id: int, size: int) -> None:
        self.granted[stream_id] += size
        self.session_granted += size
        if not self.writer.is_closing():
            self.raw(spdy.encode_window_update(stream_id, size))
            self.raw(spdy.encode_window_update(0, size))

    def raw(self, data: bytes) -> None:
        self.writer.write(data)

    def open(self, stream_type: str, *, fin: bool = False, **headers: str) -> int:
        stream_id = self.next_id
        self.next_id += 2
        self.raw(self.framer.syn_stream(stream_id, {"streamtype": stream_type, **headers},
                                        fin=fin))
        return stream_id

    async def send(self, stream_id: int, data: bytes, *, fin: bool = False,
                   chunk: int = 32 * 1024) -> None:
        view = memoryview(data)
        while True:
            size = min(len(view), chunk)
            if self.strict and size:
                while min(self.send_windows[stream_id], self.session_send_window) <= 0:
                    if self.eof.is_set():
                        raise ConnectionError("server went away")
                    self.window_changed.clear()
                    await self.window_changed.wait()
                size = min(size, self.send_windows[stream_id], self.session_send_window)
                self.send_windows[stream_id] -= size
                self.session_send_window -= size
            last = size == len(view)
            self.raw(spdy.encode_data(stream_id, view[:size], fin=fin and last))
            view = view[size:]
            await self.writer.drain()
            if last:
                return

    async def replied(self, *stream_ids: int) -> None:
        for stream_id in stream_ids:
            await asyncio.wait_for(self.replies[stream_id].wait(), 5)

    async def finished(self, *stream_ids: int, timeout: float = 10) -> None:
        for stream_id in stream_ids:
            await asyncio.wait_for(self.fins[stream_id].wait(), timeout)

    async def hang_up(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError):
            await self.writer.wait_closed()
        await asyncio.wait_for(self.task, 5)


@contextlib.asynccontextmanager
async def served(serve: Serve, *, window: int | None = None
                 ) -> AsyncIterator[tuple[Client, asyncio.Future[None]]]:
    """``serve`` on one loopback TCP connection; the future ends with it."""
    done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    async def on_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await serve(reader, writer)
        except Exception as e:  # noqa: BLE001 - handed to the test through the future
            done.set_exception(e)
        else:
            done.set_result(None)

    server = await asyncio.start_server(on_client, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    client = Client(reader, writer, window=window)
    try:
        yield client, done
    finally:
        client.writer.transport.abort()
        await asyncio.gather(client.task, return_exceptions=True)
        server.close()
        await asyncio.wait({done}, timeout=5)  # its outcome is the test's to check


def exec_session(handler: Callable[[CommandStreams], Awaitable[None]], options: Options,
                 version: str = V4) -> Serve:
    return partial(spdy.serve_command, options=options, version=version, handler=handler)


SUCCESS = {"metadata": {}, "status": "Success"}


# ----------------------------------------------------------------------------- framing


def test_dictionary_is_spdy3s() -> None:
    # Every SPDY/3 header block opens with this dictionary id (its Adler-32).
    assert len(spdy.DICTIONARY) == 1423
    assert zlib.adler32(spdy.DICTIONARY) == 0xE3C6A7C2
    assert spdy.DICTIONARY.startswith(b"\x00\x00\x00\x07options\x00\x00\x00\x04head")
    assert spdy.DICTIONARY.endswith(b"charset=iso-8859-1,utf-,*,enq=0.")
    block = Framer().syn_reply(1)[12:]
    assert block[2:6] == struct.pack("!I", 0xE3C6A7C2)


async def decode_all(data: bytes, framer: Framer | None = None) -> list[spdy.Frame]:
    reader = asyncio.StreamReader()
    reader.feed_data(data)
    reader.feed_eof()
    framer = framer or Framer()
    frames = []
    while not reader.at_eof():
        frames.append(await framer.read(reader))
    return frames


async def test_frames_round_trip() -> None:
    sender, receiver = Framer(), Framer()
    wire = b"".join([
        sender.syn_stream(1, {"streamtype": "stdin", "Port": ["80", "81"]}, fin=True, priority=3),
        sender.syn_reply(1, {"x": "y"}),
        sender.headers(3, {"a": "b"}, fin=True),
        sender.syn_stream(5, {"streamtype": "error"}, unidirectional=True),
        spdy.encode_data(1, b"hello", fin=True),
        spdy.encode_data(3),
        spdy.encode_rst_stream(7, spdy.CANCEL),
        spdy.encode_settings({spdy.SETTINGS_INITIAL_WINDOW_SIZE: 1000, 4: 10}),
        spdy.encode_ping(9),
        spdy.encode_goaway(11, spdy.GOAWAY_PROTOCOL_ERROR),
        spdy.encode_window_update(0, 4096),
        control(0x0A, b"credential"),
    ])
    assert await decode_all(wire, receiver) == [
        SynStream(1, {"streamtype": ["stdin"], "port": ["80", "81"]}, fin=True, priority=3),
        SynReply(1, {"x": ["y"]}),
        HeadersFrame(3, {"a": ["b"]}, fin=True),
        SynStream(5, {"streamtype": ["error"]}, unidirectional=True),
        DataFrame(1, b"hello", fin=True),
        DataFrame(3, b""),
        RstStream(7, spdy.CANCEL),
        Settings(((0, spdy.SETTINGS_INITIAL_WINDOW_SIZE, 1000), (0, 4, 10))),
        Ping(9),
        GoAway(11, spdy.GOAWAY_PROTOCOL_ERROR),
        WindowUpdate(0, 4096),
        UnknownControl(0x0A, 0),
    ]


@pytest.mark.parametrize("raw", [
    b"\x00\x00\x00\x01",  # count 1, nothing else
    b"\x00\x00\x00\x01\x00\x00\x00\x05ab",  # name cut short
    b"\x00\x00\x00\x01\x00\x00\x00\x00\x00\x00\x00\x00",  # empty name
    b"\x00\x00\x00\x00extra",
    b"\xff\xff\xff\xff",
])
def test_malformed_header_blocks_are_refused(raw: bytes) -> None:
    with pytest.raises(spdy.ProtocolError):
        spdy.parse_header_block(raw)


# ------------------------------------------------------------------------ remotecommand


async def test_exec_echoes_stdin_and_reports_status() -> None:
    async def handler(streams: CommandStreams) -> None:
        assert streams.stdin is not None and streams.version == V4
        data = await streams.stdin.read()
        await streams.write_stdout(data.upper())
        await streams.write_stderr(b"to stderr")
        await streams.finish(0)

    options = Options(stdin=True, stdout=True, stderr=True)
    async with served(exec_session(handler, options)) as (client, done):
        error = client.open("error")
        stdin = client.open("stdin")
        stdout = client.open("stdout")
        stderr = client.open("stderr")
        await client.replied(error, stdin, stdout, stderr)
        await client.send(stdin, b"hello ", fin=False)
        await client.send(stdin, b"world", fin=True)
        await client.finished(stdout, stderr, error)
        assert client.data[stdout] == b"HELLO WORLD"
        assert client.data[stderr] == b"to stderr"
        assert json.loads(client.data[error]) == SUCCESS
        await asyncio.wait_for(client.got_goaway.wait(), 5)
        assert client.goaway == GoAway(stderr, spdy.GOAWAY_OK)
        assert not done.done()  # the server waits for the client to hang up ...
        started = time.monotonic()
        await client.hang_up()
        await asyncio.wait_for(done, 5)
        assert time.monotonic() - started < 1  # ... and no longer
        assert not client.resets


async def test_exec_failure_status_carries_exit_code() -> None:
    async def handler(streams: CommandStreams) -> None:
        await streams.finish(3)

    async with served(exec_session(handler, Options(stdout=True))) as (client, done):
        error, stdout = client.open("error"), client.open("stdout")
        await client.finished(error, stdout)
        status = json.loads(client.data[error])
        assert status["status"] == "Failure" and status["reason"] == "NonZeroExitCode"
        assert status["details"]["causes"] == [{"reason": "ExitCode", "message": "3"}]
        await client.hang_up()
        await asyncio.wait_for(done, 5)


async def test_handler_exception_reaches_the_client_as_failure() -> None:
    async def handler(streams: CommandStreams) -> None:
        await streams.write_stdout(b"partial")
        raise RuntimeError("boom")

    async with served(exec_session(handler, Options(stdout=True))) as (client, done):
        error, stdout = client.open("error"), client.open("stdout")
        await client.finished(error, stdout)
        assert client.data[stdout] == b"partial"
        assert json.loads(client.data[error])["status"] == "Failure"
        await client.hang_up()
        with pytest.raises(RuntimeError, match="boom"):
            await asyncio.wait_for(done, 5)


@pytest.mark.parametrize(("options", "version", "expected"), [
    (Options(stdout=True), V4, {"error", "stdout"}),
    (Options(stdin=True, stdout=True, stderr=True), V4, {"error", "stdin", "stdout", "stderr"}),
    (Options(stdin=True, stdout=True, stderr=True, tty=True), V4,
     {"error", "stdin", "stdout", "resize"}),
    (Options(stdout=True, tty=True), V5, {"error", "stdout", "resize"}),
    (Options(stdout=True, tty=True), V2, {"error", "stdout"}),
    (Options(stdout=True, tty=True), "", {"error", "stdout"}),
])
def test_expected_channels(options: Options, version: str, expected: set[str]) -> None:
    assert spdy.expected_channels(options, version) == expected


async def test_handler_starts_once_every_expected_stream_is_open() -> None:
    started = asyncio.Event()

    async def handler(streams: CommandStreams) -> None:
        started.set()
        await streams.finish(0)

    options = Options(stdin=True, stdout=True)
    async with served(exec_session(handler, options)) as (client, done):
        client.open("error")
        client.open("stdin")
        await client.replied(1, 3)
        await asyncio.sleep(0.2)
        assert not started.is_set()
        client.open("bogus")  # accepted, as kubelet does, but it is not a channel
        await client.replied(5)
        await asyncio.sleep(0.1)
        assert not started.is_set()
        client.open("stdout")
        await asyncio.wait_for(started.wait(), 5)
        await client.finished(1)
        await client.hang_up()
        await asyncio.wait_for(done, 5)


async def test_missing_streams_time_out(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(spdy.remotecommand, "STREAM_TIMEOUT", 0.3)
    called = False

    async def handler(streams: CommandStreams) -> None:
        nonlocal called
        called = True

    async with served(exec_session(handler, Options(stdout=True))) as (client, done):
        client.open("error")
        await asyncio.wait_for(done, 5)
        await asyncio.wait_for(client.eof.wait(), 5)
        assert client.goaway is not None and not called


async def test_tty_streams_and_resizes() -> None:
    sizes: list[tuple[int, int]] = []

    async def handler(streams: CommandStreams) -> None:
        while len(sizes) < 3:
            sizes.append(await streams.resizes.get())
        await streams.write_stderr(b"dropped: no stderr with a tty")
        await streams.finish(0)

    # With a TTY the client opens no stderr, and a resize stream from v3 on.
    options = Options(stdin=True, stdout=True, stderr=True, tty=True)
    async with served(exec_session(handler, options)) as (client, done):
        error, stdin, stdout = client.open("error"), client.open("stdin"), client.open("stdout")
        resize = client.open("resize")
        await client.replied(error, stdin, stdout, resize)
        for message in (b'{"Width":80,"Height":24}\n', b'{"Width":100,', b'"Height":50}\n',
                        b"garbage\n", b'{"Width":0,"Height":1}\n', b'{"Width":120,"Height":40}'):
            await client.send(resize, message)
        await client.finished(error, stdout)
        assert sizes == [(80, 24), (100, 50), (120, 40)]
        assert json.loads(client.data[error]) == SUCCESS
        await client.hang_up()
        await asyncio.wait_for(done, 5)


async def test_v2_expects_no_resize_stream() -> None:
    async def handler(streams: CommandStreams) -> None:
        await streams.write_stdout(b"ok")
        await streams.send_status(b"")

    options = Options(stdout=True, tty=True)
    async with served(exec_session(handler, options, V2)) as (client, done):
        error, stdout = client.open("error"), client.open("stdout")
        await client.finished(error, stdout)
        assert client.data[stdout] == b"ok" and client.data[error] == b""
        await client.hang_up()
        await asyncio.wait_for(done, 5)


async def digest_stdin(streams: CommandStreams) -> None:
    assert streams.stdin is not None
    digest, size = hashlib.sha256(), 0
    while chunk := await streams.stdin.read(5000):
        digest.update(chunk)
        size += len(chunk)
        await asyncio.sleep(0)
    await streams.write_stdout(f"{size} {digest.hexdigest()}".encode())
    await streams.finish(0)


@pytest.mark.parametrize("strict", [False, True], ids=["spdystream-like", "flow-controlled"])
async def test_large_upload_completes(strict: bool) -> None:
    # A strict client never sends beyond our windows: this only ends if we keep
    # granting WINDOW_UPDATEs for what we consume.
    payload = os.urandom(1024 * 1024)
    options = Options(stdin=True, stdout=True)
    async with served(exec_session(digest_stdin, options), window=65536 if strict else None
                      ) as (client, done):
        error, stdin, stdout = client.open("error"), client.open("stdin"), client.open("stdout")
        await client.replied(error, stdin, stdout)
        await asyncio.wait_for(client.send(stdin, payload, fin=True), 20)
        await client.finished(stdout, error, timeout=20)
        expected = f"{len(payload)} {hashlib.sha256(payload).hexdigest()}".encode()
        assert client.data[stdout] == expected
        assert any(update.stream_id == 0 for update in client.window_updates)
        assert any(update.stream_id == stdin for update in client.window_updates)
        await client.hang_up()
        await asyncio.wait_for(done, 5)


async def test_unread_stdin_pushes_back_on_the_client() -> None:
    go = asyncio.Event()

    async def handler(streams: CommandStreams) -> None:
        await go.wait()
        await digest_stdin(streams)

    payload = b"x" * (48 * 1024 * 1024)
    options = Options(stdin=True, stdout=True)
    async with served(exec_session(handler, options)) as (client, done):
        error, stdin, stdout = client.open("error"), client.open("stdin"), client.open("stdout")
        await client.replied(error, stdin, stdout)
        upload = asyncio.create_task(client.send(stdin, payload, fin=True))
        await asyncio.sleep(0.5)
        # Kernel buffers hold a few MiB; the rest waits for the handler to read.
        assert not upload.done()
        go.set()
        await asyncio.wait_for(upload, 30)
        await client.finished(stdout, timeout=30)
        assert client.data[stdout].startswith(f"{len(payload)} ".encode())
        await client.hang_up()
        await asyncio.wait_for(done, 5)


async def write_megabyte(streams: CommandStreams) -> None:
    await streams.write_stdout(bytes(range(256)) * 2048)
    for _ in range(64):
        await streams.write_stderr(b"e" * 1000)
    await streams.finish(0)


async def test_large_output_to_a_client_without_flow_control() -> None:
    # spdystream never sends WINDOW_UPDATE: holding it to 64 KiB would hang here.
    options = Options(stdout=True, stderr=True)
    async with served(exec_session(write_megabyte, options)) as (client, done):
        error, stdout, stderr = client.open("error"), client.open("stdout"), client.open("stderr")
        await client.finished(stdout, stderr, error)
        assert client.data[stdout] == bytes(range(256)) * 2048
        assert len(client.data[stderr]) == 64000
        await client.hang_up()
        await asyncio.wait_for(done, 5)


async def test_large_output_stays_within_a_strict_clients_windows() -> None:
    options = Options(stdout=True, stderr=True)
    async with served(exec_session(write_megabyte, options), window=8192) as (client, done):
        error, stdout, stderr = client.open("error"), client.open("stdout"), client.open("stderr")
        await client.finished(stdout, stderr, error, timeout=20)
        assert client.data[stdout] == bytes(range(256)) * 2048
        assert len(client.data[stderr]) == 64000
        assert client.violations == []
        await client.hang_up()
        await asyncio.wait_for(done, 5)


async def test_pings_are_answered() -> None:
    release = asyncio.Event()

    async def handler(streams: CommandStreams) -> None:
        await release.wait()
        await streams.finish(0)

    async with served(exec_session(handler, Options(stdout=True))) as (client, done):
        client.raw(spdy.encode_ping(1))
        assert await asyncio.wait_for(client.pings.get(), 5) == 1
        client.open("error")
        client.open("stdout")
        client.raw(spdy.encode_ping(2))  # even: the answer to a ping of ours, not echoed
        client.raw(spdy.encode_ping(7))
        assert await asyncio.wait_for(client.pings.get(), 5) == 7
        release.set()
        await client.finished(1, 3)
        assert client.pings.empty()
        await client.hang_up()
        await asyncio.wait_for(done, 5)


async def test_unknown_control_frames_and_settings_are_ignored() -> None:
    async def handler(streams: CommandStreams) -> None:
        await streams.write_stdout(b"fine")
        await streams.finish(0)

    async with served(exec_session(handler, Options(stdout=True))) as (client, done):
        client.raw(control(0x0A, b"\x00" * 12))
        client.raw(control(0x7777, b"whatever", flags=0xFF))
        client.raw(spdy.encode_settings({4: 100, 1: 5}))
        client.raw(spdy.encode_goaway(0))  # says the client opens no more; we go on
        error, stdout = client.open("error"), client.open("stdout")
        await client.finished(error, stdout)
        assert client.data[stdout] == b"fine"
        await client.hang_up()
        await asyncio.wait_for(done, 5)


async def test_client_disconnect_mid_command() -> None:
    state: dict[str, object] = {}

    async def handler(streams: CommandStreams) -> None:
        assert streams.stdin is not None
        state["first"] = await streams.stdin.read(100)
        state["then"] = await asyncio.wait_for(streams.stdin.read(100), 5)
        await streams.write_stdout(b"x" * 200_000)
        await streams.write_stderr(b"nobody listens")
        await streams.finish(1)
        state["finished"] = True

    options = Options(stdin=True, stdout=True, stderr=True)
    async with served(exec_session(handler, options)) as (client, done):
        for kind in ("error", "stdin", "stdout", "stderr"):
            client.open(kind)
        await client.replied(1, 3, 5, 7)
        await client.send(3, b"abc")
        await asyncio.sleep(0.1)
        client.writer.transport.abort()
        await asyncio.wait_for(done, 5)  # no exception leaked out of serve_command
    assert state == {"first": b"abc", "then": b"", "finished": True}


async def test_reset_stdin_gives_the_handler_eof() -> None:
    async def handler(streams: CommandStreams) -> None:
        assert streams.stdin is not None
        data = await streams.stdin.read()
        await streams.write_stdout(b"got %d" % len(data))
        await streams.finish(0)

    options = Options(stdin=True, stdout=True)
    async with served(exec_session(handler, options)) as (client, done):
        error, stdin, stdout = client.open("error"), client.open("stdin"), client.open("stdout")
        await client.replied(error, stdin, stdout)
        await client.send(stdin, b"12345")
        client.raw(spdy.encode_rst_stream(stdin, spdy.CANCEL))
        await client.finished(stdout, error)
        assert client.data[stdout] == b"got 5"
        await client.hang_up()
        await asyncio.wait_for(done, 5)


def syn_stream_with_block(block: bytes, stream_id: int = 1) -> bytes:
    return control(spdy.SYN_STREAM, struct.pack("!IIBB", stream_id, 0, 0, 0) + block)


def compressed(raw: bytes) -> bytes:
    deflate = zlib.compressobj(zdict=spdy.DICTIONARY)
    return deflate.compress(raw) + deflate.flush(zlib.Z_SYNC_FLUSH)


def zlib_bomb() -> bytes:
    value = b"\x00" * (16 * 1024 * 1024)
    raw = struct.pack("!II", 1, 1) + b"a" + struct.pack("!I", len(value)) + value
    block = compressed(raw)
    assert len(block) < spdy.MAX_CONTROL_FRAME
    return syn_stream_with_block(block)


HOSTILE = {
    "bad version": control(spdy.SYN_STREAM, b"\x00" * 10, version=2),
    "huge data frame": struct.pack("!II", 1, 0xFFFFFF),
    "huge control frame": control(spdy.SYN_STREAM, b"", length=0xFFFFFF),
    "garbage header block": syn_stream_with_block(os.urandom(64)),
    "zlib bomb": zlib_bomb(),
    "header block short of its pairs": syn_stream_with_block(
        compressed(struct.pack("!II", 5, 1) + b"a" + struct.pack("!I", 1) + b"b")),
    "even stream id": Framer().syn_stream(2, {"streamtype": "error"}),
    "stream id 0": Framer().syn_stream(0, {"streamtype": "error"}),
    "ping of wrong length": control(spdy.PING, b"\x00" * 8),
    "malformed settings": control(spdy.SETTINGS, struct.pack("!I", 3) + b"\x00" * 8),
    "data on stream 0": spdy.encode_data(0, b"x"),
    "short rst_stream": control(spdy.RST_STREAM, b"\x00\x00\x00\x01"),
}


@pytest.mark.parametrize("wire", HOSTILE.values(), ids=HOSTILE.keys())
async def test_hostile_input_ends_the_session(wire: bytes) -> None:
    called = False

    async def handler(streams: CommandStreams) -> None:
        nonlocal called
        called = True

    started = time.monotonic()
    async with served(exec_session(handler, Options(stdout=True))) as (client, done):
        client.raw(wire)
        await asyncio.wait_for(done, 5)
        await asyncio.wait_for(client.eof.wait(), 5)
        assert client.goaway is not None
        assert client.goaway.status == spdy.GOAWAY_PROTOCOL_ERROR
    assert time.monotonic() - started < 3 and not called


async def test_streams_out_of_order_end_the_session() -> None:
    async def handler(streams: CommandStreams) -> None:
        await asyncio.sleep(10)

    options = Options(stdin=True, stdout=True)
    async with served(exec_session(handler, options)) as (client, done):
        client.next_id = 5
        client.open("error")
        client.next_id = 3
        client.open("stdout")
        await asyncio.wait_for(client.eof.wait(), 5)
        assert client.goaway is not None
        assert client.goaway.status == spdy.GOAWAY_PROTOCOL_ERROR
        await asyncio.wait_for(done, 5)


async def test_hostile_input_mid_command_gives_the_handler_eof() -> None:
    seen: list[bytes] = []

    async def handler(streams: CommandStreams) -> None:
        assert streams.stdin is not None
        seen.append(await asyncio.wait_for(streams.stdin.read(), 5))
        await streams.write_stdout(b"lost")
        await streams.finish(0)

    options = Options(stdin=True, stdout=True)
    async with served(exec_session(handler, options)) as (client, done):
        for kind in ("error", "stdin", "stdout"):
            client.open(kind)
        await client.replied(1, 3, 5)
        await client.send(3, b"partial")
        client.raw(HOSTILE["zlib bomb"])
        await asyncio.wait_for(done, 5)
    assert seen == [b"partial"]


# -------------------------------------------------------------------------- portforward


@contextlib.asynccontextmanager
async def echo_server() -> AsyncIterator[tuple[int, list[asyncio.StreamWriter]]]:
    """Echoes until EOF, then hangs up; ``peers`` lets a test see open connections."""
    peers: list[asyncio.StreamWriter] = []

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peers.append(writer)
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(echo, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1], peers
    finally:
        server.close()


def dialer(port: int, calls: list[int]) -> Callable[[int], Awaitable[Target]]:
    async def connect(requested: int) -> Target:
        calls.append(requested)
        if requested == 81:
            raise ConnectionRefusedError("connection refused")
        return await asyncio.open_connection("127.0.0.1", port)
    return connect


def open_pair(client: Client, request_id: str, port: str = "80") -> tuple[int, int]:
    error = client.open("error", port=port, requestid=request_id)
    data = client.open("data", port=port, requestid=request_id)
    return error, data


async def test_portforward_pipes_both_ways() -> None:
    calls: list[int] = []
    async with echo_server() as (port, _), served(
            partial(spdy.serve_portforward, connect=dialer(port, calls))) as (client, done):
        first_error, first_data = open_pair(client, "0")
        second_error = client.open("error", port="8080", requestid="1")
        await client.send(first_error, b"", fin=True)  # kubectl closes its error side
        await client.replied(first_error, first_data, second_error)
        await client.send(first_data, b"ping ")
        second_data = client.open("data", port="8080", requestid="1")
        await client.send(second_data, b"other", fin=True)
        await client.send(first_data, b"pong" * 50_000, fin=True)
        await client.finished(first_data, first_error, second_data, second_error)
        assert client.data[first_data] == b"ping " + b"pong" * 50_000
        assert client.data[second_data] == b"other"
        assert client.data[first_error] == client.data[second_error] == b""
        assert sorted(calls) == [80, 8080]
        assert not done.done()  # a port forward session lasts until the client leaves
        await client.hang_up()
        await asyncio.wait_for(done, 5)


async def test_portforward_connect_failure_is_reported() -> None:
    calls: list[int] = []
    async with served(partial(spdy.serve_portforward, connect=dialer(1, calls))) as (client, done):
        error, data = open_pair(client, "7", port="81")
        await client.finished(error, data)
        report = json.loads(client.data[error])
        assert report["closeConnection"] is True
        assert "error forwarding port 81" in report["message"]
        assert "connection refused" in report["message"]
        await client.hang_up()
        await asyncio.wait_for(done, 5)


async def test_portforward_legacy_clients_pair_by_stream_id() -> None:
    calls: list[int] = []
    async with echo_server() as (port, _), served(
            partial(spdy.serve_portforward, connect=dialer(port, calls))) as (client, done):
        error = client.open("error", port="80")
        data = client.open("data", port="80")
        await client.send(data, b"old", fin=True)
        await client.finished(data, error)
        assert client.data[data] == b"old" and calls == [80]
        await client.hang_up()
        await asyncio.wait_for(done, 5)


@pytest.mark.parametrize("headers", [
    {"port": "0"}, {"port": "65536"}, {"port": "http"}, {}, {"port": "80", "streamtype": "x"},
])
async def test_portforward_rejects_bad_streams(headers: dict[str, str]) -> None:
    async with served(partial(spdy.serve_portforward, connect=dialer(1, []))) as (client, done):
        stream_type = headers.pop("streamtype", "data")
        stream = client.open(stream_type, requestid="1", **headers)
        await client.replied(stream)
        assert client.resets == {stream: spdy.CANCEL}
        await client.hang_up()
        await asyncio.wait_for(done, 5)


async def test_portforward_client_leaving_closes_target_connections() -> None:
    async with echo_server() as (port, peers), served(
            partial(spdy.serve_portforward, connect=dialer(port, []))) as (client, done):
        _error, data = open_pair(client, "3")
        await client.send(data, b"hi")
        while client.data[data] != b"hi":
            await asyncio.sleep(0.01)
        client.writer.transport.abort()
        await asyncio.wait_for(done, 5)
        assert len(peers) == 1
        deadline = time.monotonic() + 5
        while not peers[0].is_closing() and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        assert peers[0].is_closing()


async def test_portforward_reset_data_stream_ends_the_pipe() -> None:
    async with echo_server() as (port, peers), served(
            partial(spdy.serve_portforward, connect=dialer(port, []))) as (client, done):
        error, data = open_pair(client, "4")
        await client.send(data, b"hi")
        while client.data[data] != b"hi":
            await asyncio.sleep(0.01)
        client.raw(spdy.encode_rst_stream(data, spdy.CANCEL))
        await client.finished(error)
        deadline = time.monotonic() + 5
        while not peers[0].is_closing() and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        assert peers[0].is_closing()
        await client.hang_up()
        await asyncio.wait_for(done, 5)
