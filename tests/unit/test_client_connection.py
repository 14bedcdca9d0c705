"""ctrd.client over a small in-process gRPC server: namespace metadata, error mapping,
streams, and the blocking facade."""
from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from google.protobuf import timestamp_pb2

from ctrd import errors, protoutil
from ctrd.api.containerd.events import namespace_pb2 as ns_events
from ctrd.api.containerd.services.events.v1 import events_pb2, events_pb2_grpc
from ctrd.api.containerd.services.namespaces.v1 import namespace_pb2, namespace_pb2_grpc
from ctrd.api.containerd.services.version.v1 import version_pb2, version_pb2_grpc
from ctrd.client import AsyncClient, Client
from ctrd.client.connection import target


class FakeNamespaces(namespace_pb2_grpc.NamespacesServicer):
    def __init__(self) -> None:
        self.seen_metadata: list[dict[str, str]] = []

    async def List(self, request, context):
        self.seen_metadata.append({m.key: m.value for m in context.invocation_metadata()})
        return namespace_pb2.ListNamespacesResponse(
            namespaces=[namespace_pb2.Namespace(name="default", labels={"a": "b"})])

    async def Get(self, request, context):
        await context.abort(grpc.StatusCode.NOT_FOUND, f"namespace {request.name}: not found")

    async def Create(self, request, context):
        await context.abort(grpc.StatusCode.ALREADY_EXISTS, "exists")


class FakeVersion(version_pb2_grpc.VersionServicer):
    async def Version(self, request, context):
        return version_pb2.VersionResponse(version="9.9", revision="r")


class FakeEvents(events_pb2_grpc.EventsServicer):
    async def Subscribe(self, request, context):
        for i in range(3):
            yield events_pb2.Envelope(
                timestamp=timestamp_pb2.Timestamp(seconds=i), namespace="default",
                topic="/namespaces/create",
                event=protoutil.pack(ns_events.NamespaceCreate(name=f"n{i}")))


class Server:
    """A gRPC server on a unix socket, run on its own loop in a thread so that both
    the async and the blocking client can be tried against it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.namespaces = FakeNamespaces()
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_until_complete(self._start())
        self.ready.set()
        self.loop.run_forever()

    async def _start(self) -> None:
        self.server = grpc.aio.server()
        namespace_pb2_grpc.add_NamespacesServicer_to_server(self.namespaces, self.server)
        version_pb2_grpc.add_VersionServicer_to_server(FakeVersion(), self.server)
        events_pb2_grpc.add_EventsServicer_to_server(FakeEvents(), self.server)
        self.server.add_insecure_port(f"unix:{self.path}")
        await self.server.start()

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.server.stop(0), self.loop).result(5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    srv = Server(tmp_path / "fake.sock")
    srv.thread.start()
    assert srv.ready.wait(10)
    try:
        yield srv
    finally:
        srv.stop()


@pytest.mark.parametrize("address,expected", [
    ("/run/x.sock", "unix:/run/x.sock"), ("unix:///run/x.sock", "unix:/run/x.sock"),
    ("unix:/x", "unix:/x"), ("127.0.0.1:1234", "127.0.0.1:1234"),
])
def test_target(address: str, expected: str) -> None:
    assert target(address) == expected


async def test_async_client_sends_namespace_and_maps_errors(server: Server) -> None:
    async with AsyncClient(str(server.path), namespace="team-a") as client:
        found = await client.namespaces.list()
        assert found[0].name == "default" and found[0].labels == {"a": "b"}
        assert server.namespaces.seen_metadata[-1]["containerd-namespace"] == "team-a"
        with pytest.raises(errors.NotFound, match="nope: not found"):
            await client.namespaces.get("nope")
        with pytest.raises(errors.AlreadyExists):
            await client.namespaces.create("x")
        # The service exists only partly: a missing method is Unimplemented.
        with pytest.raises(errors.Unimplemented):
            await client.containers.list()
        other = client.with_namespace("team-b")
        await other.namespaces.list()
        assert server.namespaces.seen_metadata[-1]["containerd-namespace"] == "team-b"


async def test_events_stream_decodes_payloads(server: Server) -> None:
    async with AsyncClient(str(server.path)) as client:
        got = [e async for e in client.events.subscribe()]
    assert [e.payload for e in got] == [{"name": "n0"}, {"name": "n1"}, {"name": "n2"}]
    assert got[1].timestamp == 1_000_000_000 and got[0].type == "containerd.events.NamespaceCreate"


def test_blocking_client(server: Server) -> None:
    with Client(str(server.path)) as client:
        assert client.version().version == "9.9"
        assert [n.name for n in client.namespaces.list()] == ["default"]
        with pytest.raises(errors.NotFound):
            client.namespaces.get("x")
        assert len(list(client.events.subscribe())) == 3
        assert client.with_namespace("other").namespaces.list()[0].name == "default"


def test_unreachable_daemon_is_unavailable(tmp_path: Path) -> None:
    with Client(str(tmp_path / "nothing.sock")) as client:
        with pytest.raises(errors.Unavailable, match="cannot reach daemon"):
            client.version()
