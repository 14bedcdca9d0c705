"""ttrpc framing, envelope and both client/server flavours, including across flavours."""
from __future__ import annotations

import asyncio
import os
import socket
import struct
import tempfile
import threading
import time
from collections.abc import Iterator

import pytest

from ctrd import errors
from ctrd.api.containerd.runtime.task.v2 import shim_pb2
from ctrd.api.ttrpc import ttrpc_pb2
from ctrd.ttrpc import aio, blocking, codec, framing
from ctrd.ttrpc.codec import CallContext, ClosedError

SERVICE = "containerd.task.v2.Task"


# --- framing ------------------------------------------------------------------------


def test_header_layout() -> None:
    data = framing.encode(7, framing.TYPE_REQUEST, b"abc")
    assert data[:10] == struct.pack(">IIBB", 3, 7, 1, 0)
    assert data[10:] == b"abc"


def test_decoder_is_incremental() -> None:
    stream = framing.encode(1, 1, b"x" * 100) + framing.encode(3, 2, b"")
    dec = framing.Decoder()
    frames = []
    for i in range(0, len(stream), 7):
        frames += dec.feed(stream[i:i + 7])
    assert [(f.stream_id, f.type, f.payload) for f in frames] == [(1, 1, b"x" * 100), (3, 2, b"")]
    assert dec.pending == 0


def test_decoder_skips_oversized_frames() -> None:
    big = framing.MAX_MESSAGE + 1
    dec = framing.Decoder()
    frames = dec.feed(struct.pack(">IIBB", big, 5, 1, 0) + b"\0" * 1000)
    assert len(frames) == 1 and frames[0].payload is None and frames[0].length == big
    frames = dec.feed(b"\0" * (big - 1000) + framing.encode(7, 1, b"ok"))
    assert [(f.stream_id, f.payload) for f in frames] == [(7, b"ok")]


# --- envelope ----------------------------------------------------------------------


def test_request_envelope_roundtrip() -> None:
    data = codec.encode_request("s", "m", b"p", timeout=1.5,
                                metadata={"containerd-namespace": "ns", "k": ["a", "b"]})
    req = ttrpc_pb2.Request.FromString(data)
    assert req.timeout_nano == 1_500_000_000
    ctx, payload = codec.decode_request(data)
    assert (ctx.service, ctx.method, payload, ctx.timeout) == ("s", "m", b"p", 1.5)
    assert ctx.namespace == "ns" and ctx.metadata["k"] == ["a", "b"]
    assert ctx.get("CONTAINERD-NAMESPACE") == "ns"


def test_ok_response_has_no_status() -> None:
    resp = ttrpc_pb2.Response.FromString(codec.encode_response(b"x"))
    assert not resp.HasField("status") and resp.payload == b"x"


def test_error_response_maps_to_ctrd_errors() -> None:
    data = codec.encode_response(exc=errors.NotFound("container not created"))
    resp = ttrpc_pb2.Response.FromString(data)
    assert resp.status.code == 5
    with pytest.raises(errors.NotFound, match="container not created"):
        codec.decode_response(data)


# --- a service used by every server test --------------------------------------------


class Task:
    """A fake shim: Connect echoes, State fails, Wait blocks until released."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.seen: list[CallContext] = []

    def Connect(self, ctx: CallContext, req: shim_pb2.ConnectRequest) -> shim_pb2.ConnectResponse:
        self.seen.append(ctx)
        return shim_pb2.ConnectResponse(shim_pid=os.getpid(), version=req.id)

    def State(self, ctx: CallContext, req: shim_pb2.StateRequest) -> shim_pb2.StateResponse:
        raise errors.NotFound(f"container {req.id} not created")

    def Wait(self, ctx: CallContext, req: shim_pb2.WaitRequest) -> shim_pb2.WaitResponse:
        self.release.wait(10)
        return shim_pb2.WaitResponse(exit_status=int(req.id))


class AsyncTask:
    def __init__(self) -> None:
        self.release = asyncio.Event()

    async def Connect(self, ctx: CallContext, req: shim_pb2.ConnectRequest) -> shim_pb2.ConnectResponse:
        return shim_pb2.ConnectResponse(shim_pid=os.getpid(), version=req.id + ctx.namespace)

    async def State(self, ctx: CallContext, req: shim_pb2.StateRequest) -> shim_pb2.StateResponse:
        raise errors.FailedPrecondition("nope")

    async def Wait(self, ctx: CallContext, req: shim_pb2.WaitRequest) -> shim_pb2.WaitResponse:
        await self.release.wait()
        return shim_pb2.WaitResponse(exit_status=int(req.id))


@pytest.fixture
def sock_path() -> Iterator[str]:
    with tempfile.TemporaryDirectory(prefix="ttrpc-") as d:
        yield os.path.join(d, "s.sock")


def listen(path: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(path)
    s.listen(16)
    return s


@pytest.fixture
def blocking_server(sock_path: str) -> Iterator[tuple[str, Task]]:
    task = Task()
    server = blocking.Server()
    server.register_impl(shim_pb2.DESCRIPTOR.services_by_name["Task"], task)
    server.serve_in_thread(listen(sock_path))
    yield sock_path, task
    task.release.set()
    server.shutdown(grace=1)


# --- blocking flavour --------------------------------------------------------------


def test_blocking_roundtrip_and_metadata(blocking_server: tuple[str, Task]) -> None:
    path, task = blocking_server
    with blocking.Client.connect("unix://" + path) as client:
        resp = client.call(SERVICE, "Connect", shim_pb2.ConnectRequest(id="v1"),
                           shim_pb2.ConnectResponse, timeout=5,
                           metadata={"containerd-namespace": "default"})
        assert resp.shim_pid == os.getpid() and resp.version == "v1"
    ctx = task.seen[0]
    assert ctx.namespace == "default" and ctx.timeout == pytest.approx(5)


def test_blocking_errors(blocking_server: tuple[str, Task]) -> None:
    path, _ = blocking_server
    with blocking.Client.connect(path) as client:
        with pytest.raises(errors.NotFound, match="container x not created"):
            client.call(SERVICE, "State", shim_pb2.StateRequest(id="x"), shim_pb2.StateResponse)
        with pytest.raises(errors.Unimplemented, match="method Pause"):
            client.call_raw(SERVICE, "Pause", b"")
        with pytest.raises(errors.Unimplemented, match="service nope"):
            client.call_raw("nope", "Pause", b"")
        with pytest.raises(errors.InvalidArgument):
            client.call_raw(SERVICE, "Connect", b"\xff\xff")


def test_blocking_concurrent_calls(blocking_server: tuple[str, Task]) -> None:
    path, task = blocking_server
    results: list[int] = []
    with blocking.Client.connect(path) as client:
        def wait(n: int) -> None:
            results.append(client.call(SERVICE, "Wait", shim_pb2.WaitRequest(id=str(n)),
                                       shim_pb2.WaitResponse).exit_status)
        threads = [threading.Thread(target=wait, args=(n,)) for n in range(5)]
        for t in threads:
            t.start()
        # a quick call is answered while five slow ones are in flight
        assert client.call(SERVICE, "Connect", shim_pb2.ConnectRequest(),
                           shim_pb2.ConnectResponse).shim_pid == os.getpid()
        assert results == []
        task.release.set()
        for t in threads:
            t.join(5)
    assert sorted(results) == [0, 1, 2, 3, 4]


def test_blocking_timeout(blocking_server: tuple[str, Task]) -> None:
    path, _ = blocking_server
    with blocking.Client.connect(path) as client:
        start = time.monotonic()
        with pytest.raises(errors.DeadlineExceeded):
            client.call(SERVICE, "Wait", shim_pb2.WaitRequest(id="1"), shim_pb2.WaitResponse,
                        timeout=0.2)
        assert time.monotonic() - start < 2


def test_blocking_close_fails_pending(sock_path: str) -> None:
    listener = listen(sock_path)
    with blocking.Client.connect(sock_path) as client:
        conn, _ = listener.accept()
        errs: list[BaseException] = []

        def call() -> None:
            try:
                client.call_raw(SERVICE, "Wait", b"")
            except BaseException as exc:
                errs.append(exc)

        t = threading.Thread(target=call)
        t.start()
        conn.recv(100)  # the request arrived; now the peer dies without answering
        conn.close()
        t.join(5)
        assert len(errs) == 1 and isinstance(errs[0], ClosedError)
        with pytest.raises(ClosedError):
            client.call_raw(SERVICE, "Connect", b"")
    listener.close()


def test_serial_client_answers_errors_timeout_and_peer_gone(
        blocking_server: tuple[str, Task], sock_path: str) -> None:
    """The events client: no reader thread, the caller reads its own answer."""
    path, _task = blocking_server
    client = blocking.SerialClient.connect(path)
    # The server side starts a thread per connection; the client must start none.
    assert not [t for t in threading.enumerate() if t.name == "ttrpc-client"]
    req = shim_pb2.ConnectRequest(id="v2").SerializeToString()
    resp = shim_pb2.ConnectResponse.FromString(client.call_raw(SERVICE, "Connect", req, timeout=5))
    assert resp.version == "v2"
    with pytest.raises(errors.NotFound):  # an error status leaves the connection usable
        client.call_raw(SERVICE, "State", shim_pb2.StateRequest(id="x").SerializeToString())
    assert not client.closed
    with pytest.raises(errors.DeadlineExceeded):  # out of step afterwards: closed
        client.call_raw(SERVICE, "Wait", shim_pb2.WaitRequest(id="1").SerializeToString(),
                        timeout=0.2)
    assert client.closed
    with pytest.raises(ClosedError):
        client.call_raw(SERVICE, "Connect", req)


def test_serial_client_peer_closing_or_babbling(sock_path: str) -> None:
    listener = listen(sock_path)
    client = blocking.SerialClient.connect(sock_path)
    conn, _ = listener.accept()

    def peer() -> None:
        conn.recv(1 << 16)
        # An answer for a stream never asked, then garbage past the header, then EOF.
        conn.sendall(framing.encode(99, framing.TYPE_RESPONSE, b"\x0a\x00"))
        conn.close()

    t = threading.Thread(target=peer)
    t.start()
    with pytest.raises(ClosedError):
        client.call_raw(SERVICE, "Connect", b"", timeout=5)
    t.join(5)
    assert client.closed
    listener.close()


def test_server_accept_serves_from_a_polled_listener(sock_path: str) -> None:
    """The shim's main loop waits on the listener and hands each connection over."""
    import selectors

    server = blocking.Server()
    server.register_impl(shim_pb2.DESCRIPTOR.services_by_name["Task"], Task())
    listener = listen(sock_path)
    listener.setblocking(False)
    server.accept(listener)  # nothing pending: returns at once
    with selectors.DefaultSelector() as sel:
        sel.register(listener, selectors.EVENT_READ)
        clients = [blocking.Client.connect(sock_path) for _ in range(3)]
        served = 0
        while served < 3 and sel.select(5):
            server.accept(listener)
            served += 1
    for client in clients:
        with client:
            assert client.call(SERVICE, "Connect", shim_pb2.ConnectRequest(id="p"),
                               shim_pb2.ConnectResponse, timeout=5).version == "p"
    server.shutdown(grace=1)
    listener.close()


def test_server_rejects_even_stream_and_oversize(blocking_server: tuple[str, Task]) -> None:
    path, _ = blocking_server
    s = socket.socket(socket.AF_UNIX)
    s.connect(path)
    dec = framing.Decoder()

    def answer() -> ttrpc_pb2.Response:
        while True:
            frames = dec.feed(s.recv(4096))
            if frames:
                return ttrpc_pb2.Response.FromString(frames[0].payload)

    req = codec.encode_request(SERVICE, "Connect", b"")
    s.sendall(framing.encode(2, framing.TYPE_REQUEST, req))
    assert answer().status.code == errors.InvalidArgument.code
    big = framing.MAX_MESSAGE + 10
    s.sendall(struct.pack(">IIBB", big, 9, 1, 0) + b"\0" * big)
    assert answer().status.code == errors.ResourceExhausted.code
    s.sendall(framing.encode(11, framing.TYPE_REQUEST, req))  # the connection still works
    assert answer().status.code == 0
    s.close()


# --- asyncio flavour, and both flavours talking to each other ------------------------


async def test_aio_roundtrip_errors_concurrency(sock_path: str) -> None:
    task = AsyncTask()
    server = aio.Server()
    server.register_impl(shim_pb2.DESCRIPTOR.services_by_name["Task"], task)
    await server.listen(sock_path)
    client = await aio.Client.connect(sock_path)
    try:
        md = {"containerd-namespace": "ns1"}
        resp = await client.call(SERVICE, "Connect", shim_pb2.ConnectRequest(id="a-"),
                                 shim_pb2.ConnectResponse, metadata=md)
        assert resp.version == "a-ns1"
        with pytest.raises(errors.FailedPrecondition):
            await client.call(SERVICE, "State", shim_pb2.StateRequest(), shim_pb2.StateResponse)
        with pytest.raises(errors.Unimplemented):
            await client.call_raw(SERVICE, "Kill", b"")
        waits = [asyncio.create_task(client.call(SERVICE, "Wait", shim_pb2.WaitRequest(id=str(n)),
                                                 shim_pb2.WaitResponse)) for n in range(5)]
        await asyncio.sleep(0.05)
        assert not any(w.done() for w in waits)
        task.release.set()
        assert sorted(r.exit_status for r in await asyncio.gather(*waits)) == [0, 1, 2, 3, 4]
        task.release.clear()
        with pytest.raises(errors.DeadlineExceeded):
            await client.call(SERVICE, "Wait", shim_pb2.WaitRequest(id="1"),
                              shim_pb2.WaitResponse, timeout=0.1)
    finally:
        await client.close()
        await server.close()
    assert not os.path.exists(sock_path)


async def test_aio_close_fails_pending_and_on_close(sock_path: str) -> None:
    task = AsyncTask()
    server = aio.Server()
    server.register_impl(shim_pb2.DESCRIPTOR.services_by_name["Task"], task)
    await server.listen(sock_path)
    closed = asyncio.Event()
    client = await aio.Client.connect(sock_path, on_close=closed.set)
    pending = asyncio.create_task(client.call_raw(SERVICE, "Wait", b""))
    await asyncio.sleep(0.05)
    await server.close()  # the server goes away with the call unanswered
    with pytest.raises(ClosedError):
        await pending
    await asyncio.wait_for(closed.wait(), 2)
    assert client.closed
    with pytest.raises(ClosedError):
        await client.call_raw(SERVICE, "Connect", b"")
    await client.close()


async def test_aio_client_with_blocking_server(blocking_server: tuple[str, Task]) -> None:
    path, _ = blocking_server
    async with await aio.Client.connect(path) as client:
        resp = await client.call(SERVICE, "Connect", shim_pb2.ConnectRequest(id="x"),
                                 shim_pb2.ConnectResponse)
        assert resp.version == "x"
        with pytest.raises(errors.NotFound):
            await client.call(SERVICE, "State", shim_pb2.StateRequest(id="x"),
                              shim_pb2.StateResponse)


async def test_blocking_client_with_aio_server(sock_path: str) -> None:
    server = aio.Server()
    seen: list[str | None] = []

    def forward(ctx: CallContext, payload: bytes) -> bytes:  # a raw, synchronous handler
        seen.append(ctx.namespace)
        return payload[::-1]

    server.register("containerd.services.events.ttrpc.v1.Events", {"Forward": forward})
    await server.listen(sock_path)

    def use() -> bytes:
        with blocking.Client.connect(sock_path) as client:
            return client.call_raw("containerd.services.events.ttrpc.v1.Events", "Forward",
                                   b"abc", metadata={"containerd-namespace": "n"})

    assert await asyncio.to_thread(use) == b"cba"
    assert seen == ["n"]
    await server.close()
