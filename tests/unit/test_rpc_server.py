"""The daemon's own HTTP/2 gRPC server, against grpcio's client and against raw frames.

grpcio's client is an independent implementation of both HTTP/2 and gRPC, so the
first half checks interoperation (the integration suite adds Go's, through `ctr`);
the second half speaks raw HTTP/2 to check what hostile or broken peers get.
"""
from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import AsyncIterator

import grpc
import hpack
import pytest
from ctrd.daemon.rpc import Server, frames
from ctrd.daemon.rpc.status import EOF

SERVICE = "test.Echo"


class Echo:
    """A service on raw bytes (no serializers), with a handler of every kind; grpcio's
handler objects serve as well as the daemon's own."""

    def __init__(self) -> None:
        self.done: list[str] = []
        self.cancelled = asyncio.Event()

    async def unary(self, request: bytes, context) -> bytes:
        context.add_done_callback(lambda _: self.done.append("unary"))
        meta = {m.key: m.value for m in context.invocation_metadata()}
        if request == b"meta":
            return repr(sorted(meta.items())).encode()
        if request == b"abort":
            await context.abort(grpc.StatusCode.NOT_FOUND, "gone: ünïcode 100%")
        if request == b"boom":
            raise RuntimeError("surprise")
        if request == b"sleep":
            try:
                await asyncio.sleep(30)
            except asyncio.CancelledError:
                self.cancelled.set()
                raise
        if request.startswith(b"big:"):
            return b"y" * int(request[4:])
        return request

    async def server_stream(self, request: bytes, context) -> AsyncIterator[bytes]:
        for i in range(int(request)):
            yield str(i).encode()

    async def server_stream_write(self, request: bytes, context) -> None:
        for i in range(int(request)):
            await context.write(b"x" * 100_000)

    async def client_stream(self, requests: AsyncIterator[bytes], context) -> bytes:
        total = 0
        async for item in requests:
            total += len(item)
        return str(total).encode()

    async def stall(self, requests, context) -> bytes:
        await asyncio.sleep(30)  # never reads what the client sends
        return b""

    async def bidi(self, requests, context) -> None:
        context.add_done_callback(lambda _: self.done.append("bidi"))
        while True:
            item = await context.read()
            if item is EOF:
                return
            await context.write(item.upper())

    def handlers(self) -> dict[str, grpc.RpcMethodHandler]:
        return {
            "Unary": grpc.unary_unary_rpc_method_handler(self.unary),
            "ServerStream": grpc.unary_stream_rpc_method_handler(self.server_stream),
            "ServerStreamWrite": grpc.unary_stream_rpc_method_handler(self.server_stream_write),
            "ClientStream": grpc.stream_unary_rpc_method_handler(self.client_stream),
            "Bidi": grpc.stream_stream_rpc_method_handler(self.bidi),
            "Stall": grpc.stream_unary_rpc_method_handler(self.stall),
        }


@pytest.fixture
async def served(tmp_path):
    echo = Echo()
    server = Server(max_receive_message_length=8 << 20, max_send_message_length=8 << 20)
    server.add_registered_method_handlers(SERVICE, echo.handlers())
    path = str(tmp_path / "rpc.sock")
    server.add_insecure_port(f"unix://{path}")
    await server.start()
    try:
        yield server, echo, path
    finally:
        await server.stop(0)


@pytest.fixture
async def channel(served):
    _, _, path = served
    limits = [("grpc.max_receive_message_length", 16 << 20),
              ("grpc.max_send_message_length", 16 << 20)]
    async with grpc.aio.insecure_channel(f"unix://{path}", options=limits) as ch:
        yield ch


def _method(channel, kind: str, name: str):
    return getattr(channel, kind)(f"/{SERVICE}/{name}")


# ----------------------------------------------------------- grpcio client


async def test_unary_round_trip_with_metadata(channel, served):
    call = _method(channel, "unary_unary", "Unary")
    assert await call(b"hello") == b"hello"
    answer = await call(b"meta", metadata=(("containerd-namespace", "ns1"),
                                           ("blob-bin", b"\x00\xff\x01")))
    assert b"('containerd-namespace', 'ns1')" in answer
    assert b"('blob-bin', b'\\x00\\xff\\x01')" in answer
    assert served[1].done.count("unary") == 2


async def test_statuses(channel):
    call = _method(channel, "unary_unary", "Unary")
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call(b"abort")
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    assert info.value.details() == "gone: ünïcode 100%"
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call(b"boom")
    assert info.value.code() == grpc.StatusCode.UNKNOWN
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await _method(channel, "unary_unary", "Nope")(b"")
    assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED


async def test_streams_every_way(channel):
    got = [m async for m in _method(channel, "unary_stream", "ServerStream")(b"5")]
    assert got == [b"0", b"1", b"2", b"3", b"4"]
    # 30 messages of 100 kB: far beyond the client's initial window.
    got = [m async for m in _method(channel, "unary_stream", "ServerStreamWrite")(b"30")]
    assert len(got) == 30 and all(len(m) == 100_000 for m in got)

    async def chunks():
        for _ in range(40):
            yield b"z" * 65_536
    assert await _method(channel, "stream_unary", "ClientStream")(chunks()) == b"2621440"

    bidi = _method(channel, "stream_stream", "Bidi")()
    for word in (b"a", b"bc", b"def"):
        await bidi.write(word)
        assert await bidi.read() == word.upper()
    await bidi.done_writing()
    assert await bidi.read() is grpc.aio.EOF
    assert await bidi.code() == grpc.StatusCode.OK


async def test_undecodable_messages(tmp_path):
    def parse(raw: bytes) -> bytes:
        if raw == b"bad":
            raise ValueError("not a message")
        return raw

    async def unary(request, context):
        return request

    async def bidi(requests, context):
        async for item in requests:
            await context.write(item)

    server = Server()
    server.add_registered_method_handlers(SERVICE, {
        "Unary": grpc.unary_unary_rpc_method_handler(unary, request_deserializer=parse),
        "Bidi": grpc.stream_stream_rpc_method_handler(bidi, request_deserializer=parse),
    })
    path = str(tmp_path / "p.sock")
    server.add_insecure_port(f"unix://{path}")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"unix://{path}") as ch:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await ch.unary_unary(f"/{SERVICE}/Unary")(b"bad")
            assert info.value.code() == grpc.StatusCode.INTERNAL
            assert "not a message" in info.value.details()
            call = ch.stream_stream(f"/{SERVICE}/Bidi")()
            await call.write(b"good")
            assert await call.read() == b"good"
            await call.write(b"bad")
            assert await call.code() == grpc.StatusCode.INTERNAL
    finally:
        await server.stop(0)


async def test_large_messages_and_limits(channel):
    call = _method(channel, "unary_unary", "Unary")
    four_mib = b"q" * (4 << 20)
    assert await call(four_mib) == four_mib
    assert len(await call(b"big:%d" % (6 << 20))) == 6 << 20
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call(b"q" * (9 << 20))
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call(b"big:%d" % (9 << 20))
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert await call(b"still fine") == b"still fine"


async def test_deadline_and_cancellation_reach_the_handler(channel, served):
    echo = served[1]
    call = _method(channel, "unary_unary", "Unary")
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call(b"sleep", timeout=0.3)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    await asyncio.wait_for(echo.cancelled.wait(), 5)

    echo.cancelled.clear()
    pending = call(b"sleep")
    await asyncio.sleep(0.2)
    pending.cancel()
    await asyncio.wait_for(echo.cancelled.wait(), 5)

    bidi = _method(channel, "stream_stream", "Bidi")()
    await bidi.write(b"x")
    await bidi.read()
    bidi.cancel()
    for _ in range(100):
        if "bidi" in echo.done:
            break
        await asyncio.sleep(0.02)
    assert "bidi" in echo.done


async def test_many_concurrent_calls(channel):
    call = _method(channel, "unary_unary", "Unary")
    answers = await asyncio.gather(*(call(b"%d" % i) for i in range(200)))
    assert answers == [b"%d" % i for i in range(200)]


async def test_stop_lets_calls_finish_then_refuses(tmp_path):
    started = asyncio.Event()

    async def slow(request, context):
        started.set()
        await asyncio.sleep(0.3)
        return b"finished"

    server = Server()
    server.add_registered_method_handlers(
        SERVICE, {"Slow": grpc.unary_unary_rpc_method_handler(slow)})
    path = str(tmp_path / "s.sock")
    server.add_insecure_port(f"unix://{path}")
    await server.start()
    async with grpc.aio.insecure_channel(f"unix://{path}") as ch:
        pending = asyncio.ensure_future(ch.unary_unary(f"/{SERVICE}/Slow")(b""))
        await started.wait()
        await server.stop(5)
        assert await pending == b"finished"
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await ch.unary_unary(f"/{SERVICE}/Slow")(b"", timeout=2)
        assert info.value.code() in (grpc.StatusCode.UNAVAILABLE,
                                     grpc.StatusCode.DEADLINE_EXCEEDED)


# --------------------------------------------------------------- raw peers


class RawPeer:
    """A bare HTTP/2 client: frames in, frames out, nothing checked for it."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.encoder = hpack.Encoder()
        self.decoder = hpack.Decoder()

    async def __aenter__(self) -> RawPeer:
        self.reader, self.writer = await asyncio.open_unix_connection(self.path)
        return self

    async def __aexit__(self, *exc) -> None:
        self.writer.close()

    def send(self, data: bytes) -> None:
        self.writer.write(data)

    def start(self) -> None:
        self.send(frames.PREFACE + frames.settings({}))

    def request(self, stream_id: int, path: str, body: bytes | None = None, *,
                extra: list[tuple[str, str]] = (), method: str = "POST",
                content_type: str = "application/grpc", end: bool = True) -> None:
        headers = [(":method", method), (":scheme", "http"), (":path", path),
                   (":authority", "x"), ("content-type", content_type), ("te", "trailers"),
                   *extra]
        block = self.encoder.encode(headers)
        if body is None:
            self.send(frames.frame(frames.HEADERS, frames.END_HEADERS | frames.END_STREAM,
                                   stream_id, block))
            return
        self.send(frames.frame(frames.HEADERS, frames.END_HEADERS, stream_id, block))
        message = b"\x00" + struct.pack(">I", len(body)) + body
        self.send(frames.frame(frames.DATA, frames.END_STREAM if end else 0, stream_id, message))

    async def frame(self) -> tuple[int, int, int, bytes]:
        head = await asyncio.wait_for(self.reader.readexactly(9), 5)
        length = int.from_bytes(head[:3], "big")
        payload = await asyncio.wait_for(self.reader.readexactly(length), 5)
        return head[3], head[4], int.from_bytes(head[5:9], "big") & 0x7FFFFFFF, payload

    async def until(self, kind: int, stream_id: int | None = None) -> tuple[int, bytes]:
        while True:
            got_kind, flags, sid, payload = await self.frame()
            if got_kind == frames.HEADERS:
                headers = dict(self.decoder.decode(payload))
                if got_kind == kind and (stream_id is None or sid == stream_id):
                    return flags, headers
                continue
            if got_kind == kind and (stream_id is None or sid == stream_id):
                return flags, payload

    async def status(self, stream_id: int) -> dict[str, str]:
        while True:
            flags, headers = await self.until(frames.HEADERS, stream_id)
            if flags & frames.END_STREAM:
                return headers

    async def goaway_code(self) -> int:
        _, payload = await self.until(frames.GOAWAY)
        return frames.u32(payload, 4)


async def test_raw_requests_that_are_not_grpc(served):
    _, _, path = served
    async with RawPeer(path) as peer:
        peer.start()
        peer.request(1, f"/{SERVICE}/Unary", b"hi", method="GET")
        assert (await peer.status(1))[":status"] == "405"
        peer.request(3, f"/{SERVICE}/Unary", b"hi", content_type="text/plain")
        assert (await peer.status(3))[":status"] == "415"
        peer.request(5, f"/{SERVICE}/Unary", b"hi", extra=[("grpc-timeout", "99999999999S")])
        assert (await peer.status(5))["grpc-status"] == str(grpc.StatusCode.INTERNAL.value[0])
        peer.request(7, f"/{SERVICE}/Unary", b"hi", extra=[("grpc-encoding", "gzip")])
        assert (await peer.status(7))["grpc-status"] == str(
            grpc.StatusCode.UNIMPLEMENTED.value[0])
        peer.request(9, f"/{SERVICE}/Unary")  # no message at all
        assert (await peer.status(9))["grpc-status"] == str(grpc.StatusCode.INTERNAL.value[0])
        # A compressed message although nothing was negotiated.
        block = peer.encoder.encode([(":method", "POST"), (":scheme", "http"),
                                     (":path", f"/{SERVICE}/Unary"), (":authority", "x"),
                                     ("content-type", "application/grpc")])
        peer.send(frames.frame(frames.HEADERS, frames.END_HEADERS, 11, block)
                  + frames.frame(frames.DATA, frames.END_STREAM, 11, b"\x01\x00\x00\x00\x01x"))
        assert (await peer.status(11))["grpc-status"] == str(
            grpc.StatusCode.UNIMPLEMENTED.value[0])
        # Still a working connection.
        peer.request(13, f"/{SERVICE}/Unary", b"ok")
        assert (await peer.status(13))["grpc-status"] == "0"


@pytest.mark.parametrize("attack, code", [
    (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + b"\0" * 8, frames.PROTOCOL_ERROR),
    (frames.PREFACE + frames.frame(frames.DATA, 0, 0, b"x"), frames.PROTOCOL_ERROR),
    (frames.PREFACE + frames.frame(frames.HEADERS, frames.END_HEADERS, 2, b"\x82"),
     frames.PROTOCOL_ERROR),
    (frames.PREFACE + frames.frame(frames.HEADERS, frames.END_HEADERS, 1, b"\xff\xff\xff\xff"),
     frames.COMPRESSION_ERROR),
    (frames.PREFACE + b"\x01\x00\x00" + bytes((frames.DATA, 0)) + b"\x00\x00\x00\x01",
     frames.FRAME_SIZE_ERROR),
    (frames.PREFACE + frames.frame(frames.SETTINGS, 0, 0, b"\x00\x04\xff\xff\xff\xff"),
     frames.FLOW_CONTROL_ERROR),
    (frames.PREFACE + frames.frame(frames.SETTINGS, 0, 0, b"\x00\x05\x00\x00\x00\x01"),
     frames.PROTOCOL_ERROR),
    (frames.PREFACE + frames.frame(frames.PING, 0, 0, b"short"), frames.FRAME_SIZE_ERROR),
    (frames.PREFACE + frames.frame(frames.WINDOW_UPDATE, 0, 0, b"\x00\x00\x00\x00"),
     frames.PROTOCOL_ERROR),
    (frames.PREFACE + frames.frame(frames.CONTINUATION, frames.END_HEADERS, 1, b"\x82"),
     frames.PROTOCOL_ERROR),
    (frames.PREFACE + frames.frame(frames.PUSH_PROMISE, 0, 1, b"\x00\x00\x00\x02"),
     frames.PROTOCOL_ERROR),
])
async def test_protocol_violations_end_the_connection(served, attack, code):
    _, _, path = served
    async with RawPeer(path) as peer:
        peer.send(attack)
        assert await peer.goaway_code() == code
        assert await asyncio.wait_for(peer.reader.read(), 5) == b""  # closed
    async with grpc.aio.insecure_channel(f"unix://{path}") as ch:
        assert await _method(ch, "unary_unary", "Unary")(b"after") == b"after"


async def test_stream_window_overrun_resets_only_that_stream(served):
    _, _, path = served
    async with RawPeer(path) as peer:
        peer.start()
        block = peer.encoder.encode([(":method", "POST"), (":scheme", "http"),
                                     (":path", f"/{SERVICE}/Stall"),
                                     (":authority", "x"), ("content-type", "application/grpc")])
        peer.send(frames.frame(frames.HEADERS, frames.END_HEADERS, 1, block))
        size = frames.DEFAULT_MAX_FRAME - 5
        chunk = frames.frame(frames.DATA, 0, 1, b"\0" + struct.pack(">I", size) + b"m" * size)
        # Whole messages the handler never reads: once a window's worth (1 MiB) waits,
        # no more is acked, and a client that sends a further window and more is
        # reset. The connection's window is larger, so only the stream breaks.
        peer.send(chunk * (2 * (1 << 20) // frames.DEFAULT_MAX_FRAME + 8))
        _, payload = await peer.until(frames.RST_STREAM, 1)
        assert frames.u32(payload) == frames.FLOW_CONTROL_ERROR
        peer.request(3, f"/{SERVICE}/Unary", b"alive")
        assert (await peer.status(3))["grpc-status"] == "0"


async def test_continuation_padding_and_priority(served):
    _, _, path = served
    async with RawPeer(path) as peer:
        peer.start()
        block = peer.encoder.encode([(":method", "POST"), (":scheme", "http"),
                                     (":path", f"/{SERVICE}/Unary"), (":authority", "x"),
                                     ("content-type", "application/grpc"),
                                     ("big", "v" * 40_000)])
        # Padded HEADERS with a priority section and only part of the block, the rest
        # in CONTINUATION frames (each within the 16 KiB frame limit); then a padded
        # DATA frame.
        pad = 7
        headers = bytes((pad,)) + b"\x00\x00\x00\x00\x10" + block[:10] + b"\0" * pad
        rest = [block[i:i + 16_000] for i in range(10, len(block), 16_000)]
        out = frames.frame(frames.HEADERS, frames.PADDED | frames.PRIORITY_FLAG, 1, headers)
        for i, piece in enumerate(rest):
            flags = frames.END_HEADERS if i == len(rest) - 1 else 0
            out += frames.frame(frames.CONTINUATION, flags, 1, piece)
        message = b"\x00" + struct.pack(">I", 5) + b"hello"
        peer.send(out + frames.frame(frames.DATA, frames.PADDED | frames.END_STREAM, 1,
                                     bytes((3,)) + message + b"\0" * 3))
        assert (await peer.status(1))["grpc-status"] == "0"
        # A frame between HEADERS and its CONTINUATION breaks the connection.
        block = peer.encoder.encode([(":method", "POST"), (":path", f"/{SERVICE}/Unary")])
        peer.send(frames.frame(frames.HEADERS, 0, 3, block)
                  + frames.frame(frames.PING, 0, 0, b"12345678"))
        assert await peer.goaway_code() == frames.PROTOCOL_ERROR


async def test_ping_is_answered_and_unknown_frames_ignored(served):
    _, _, path = served
    async with RawPeer(path) as peer:
        peer.start()
        peer.send(frames.frame(0xEE, 0, 0, b"whatever"))
        peer.send(frames.frame(frames.PING, 0, 0, b"12345678"))
        flags, payload = await peer.until(frames.PING)
        assert flags & frames.ACK and payload == b"12345678"


async def test_peer_that_does_not_read_is_not_read_either(served):
    server, _, path = served
    async with RawPeer(path) as peer:
        peer.start()
        ping = frames.frame(frames.PING, 0, 0, b"12345678")
        for _ in range(60):  # each PING is answered; nothing here reads the answers
            peer.send(ping * 1000)
            await asyncio.sleep(0)
        for _ in range(200):
            conn = next(iter(server.connections))
            if not conn._transport.is_reading():
                break
            await asyncio.sleep(0.01)
        assert not conn._transport.is_reading()
        queued = conn._transport.get_write_buffer_size()
        assert queued < 8 << 20, queued
        # Once the peer reads (status() reads past all the PING answers), the server
        # listens again and answers what came after the flood.
        peer.request(1, f"/{SERVICE}/Unary", b"alive")
        assert (await peer.status(1))["grpc-status"] == "0"


async def test_silent_connection_is_closed(served, monkeypatch):
    from ctrd.daemon.rpc import connection
    monkeypatch.setattr(connection, "PREFACE_TIMEOUT", 0.2)
    _, _, path = served
    reader, writer = await asyncio.open_unix_connection(path)
    try:
        await asyncio.wait_for(reader.read(), 5)  # the server's SETTINGS, then EOF
        assert reader.at_eof()
    finally:
        writer.close()


def test_only_unix_sockets(tmp_path):
    server = Server()
    with pytest.raises(ValueError):
        server.add_insecure_port("127.0.0.1:0")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(tmp_path / "taken"))
    try:
        with pytest.raises(OSError):
            server.add_insecure_port(f"unix://{tmp_path / 'taken'}")
    finally:
        sock.close()


# ------------------------------------------ services from protobuf descriptors


async def test_descriptor_services_through_the_registrar(tmp_path) -> None:
    """How the daemon's services register: by descriptor, wrapped by the interceptor.
    Methods the servicer lacks are UNIMPLEMENTED; core errors map to their codes."""
    from ctrd.daemon.services.interceptor import ErrorInterceptor
    from google.protobuf import empty_pb2

    from ctrd.api.containerd.services.namespaces.v1 import namespace_pb2 as ns_pb
    from ctrd.api.containerd.services.namespaces.v1 import namespace_pb2_grpc as ns_grpc
    from ctrd.api.containerd.services.version.v1 import version_pb2_grpc
    from ctrd.errors import NotFound

    class Namespaces:  # only Get and List
        async def Get(self, request, context):
            raise NotFound(f"namespace {request.name} not found")

        async def List(self, request, context):
            return ns_pb.ListNamespacesResponse(namespaces=[ns_pb.Namespace(name="a")])

    server = Server()
    ErrorInterceptor().registrar(server).add_service(
        ns_pb.DESCRIPTOR.services_by_name["Namespaces"], Namespaces())
    path = str(tmp_path / "rpc.sock")
    server.add_insecure_port(f"unix://{path}")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"unix://{path}") as ch:
            stub = ns_grpc.NamespacesStub(ch)
            listed = await stub.List(ns_pb.ListNamespacesRequest())
            assert [n.name for n in listed.namespaces] == ["a"]
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.Get(ns_pb.GetNamespaceRequest(name="x"))
            assert info.value.code() == grpc.StatusCode.NOT_FOUND
            assert "namespace x not found" in info.value.details()
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.Delete(ns_pb.DeleteNamespaceRequest(name="x"))
            assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
            with pytest.raises(grpc.aio.AioRpcError) as info:  # a service never registered
                await version_pb2_grpc.VersionStub(ch).Version(empty_pb2.Empty())
            assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
    finally:
        await server.stop(0)


def test_the_daemon_loads_neither_grpcio_nor_rich_nor_httpx() -> None:
    """grpcio's C core (~12 MiB), rich (~3 MiB) and httpx (~4.7 MiB, loaded on the
    first pull) would be memory that every running container shares."""
    import subprocess
    import sys

    code = ("import contextlib, io, sys\n"
            "sys.argv = ['ctrd', 'config', 'default']\n"
            "from ctrd.daemon import entry\n"
            "with contextlib.redirect_stdout(io.StringIO()):\n"
            "    entry.main()\n"
            "import ctrd.daemon.plugins\n"
            "names = ('grpc', 'rich', 'httpx', 'httpcore', 'h11', 'anyio')\n"
            "loaded = [m for m in sys.modules if m.split('.')[0] in names\n"
            "          and sys.modules[m] is not None\n"
            "          and type(sys.modules[m]).__name__ != '_LazyModule']\n"
            "print(sorted(loaded))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[]"
