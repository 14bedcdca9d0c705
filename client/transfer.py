"""Pulling images through containerd 1.7's Transfer service.

The daemon does the work (resolve, fetch, unpack); the client names a source
(an OCI registry reference) and a destination (the image store), and may open
a side stream through the Streaming service on which the daemon reports progress.
"""
from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import grpc
from google.protobuf import any_pb2

from ctrd import errors, protoutil
from ctrd.api.containerd.services.streaming.v1 import streaming_pb2
from ctrd.api.containerd.services.streaming.v1 import streaming_pb2_grpc
from ctrd.api.containerd.services.transfer.v1 import transfer_pb2 as pb
from ctrd.api.containerd.services.transfer.v1 import transfer_pb2_grpc as pb_grpc
from ctrd.api.containerd.types.transfer import imagestore_pb2, progress_pb2, registry_pb2

from .connection import Connection, translate
from .snapshots import DEFAULT_SNAPSHOTTER
from .types import Platform
from .version import Introspection


@dataclass(frozen=True)
class Progress:
    event: str  # e.g. resolving, downloading, complete, or a reference name
    name: str
    parents: tuple[str, ...] = ()
    progress: int = 0
    total: int = 0


@dataclass(frozen=True)
class PullOptions:
    platforms: tuple[Platform, ...] = field(default_factory=lambda: (Platform.host(),))
    unpack: bool = True
    snapshotter: str = DEFAULT_SNAPSHOTTER
    labels: dict[str, str] = field(default_factory=dict)
    plain_http: bool = False


class Transfer:
    def __init__(self, conn: Connection) -> None:
        self._conn = conn
        self._stub = pb_grpc.TransferStub(conn.channel)
        self._streaming = streaming_pb2_grpc.StreamingStub(conn.channel)

    async def pull(self, reference: str, options: PullOptions = PullOptions(),
                   progress: Callable[[Progress], None] | None = None) -> None:
        """Fetch ``reference`` (fully qualified) into the image store under that name."""
        source = registry_pb2.OCIRegistry(
            reference=reference,
            resolver=registry_pb2.RegistryResolver(
                default_scheme="http" if options.plain_http else ""))
        unpacks = [imagestore_pb2.UnpackConfiguration(platform=p.to_pb(),
                                                      snapshotter=options.snapshotter)
                   for p in options.platforms] if options.unpack else []
        destination = imagestore_pb2.ImageStore(
            name=reference, labels=options.labels,
            platforms=[p.to_pb() for p in options.platforms], unpacks=unpacks)
        await self.transfer(protoutil.pack(source), protoutil.pack(destination), progress)

    async def transfer(self, source: any_pb2.Any, destination: any_pb2.Any,
                       progress: Callable[[Progress], None] | None = None) -> None:
        # Ask first: against a daemon without the service, the progress stream's first
        # write can lose the race with the rejection and fail as INTERNAL, not UNIMPLEMENTED.
        if not await Introspection(self._conn).has_plugin("io.containerd.grpc.v1", "transfer"):
            raise errors.Unimplemented(
                f"the daemon at {self._conn.address} has no Transfer service "
                "(containerd 1.7+ or ctrd needed to pull)")
        opts = pb.TransferOptions()
        reader: asyncio.Task | None = None
        stream = None
        if progress is not None:
            stream_id = f"progress-{secrets.token_hex(8)}"
            stream = await self._open_stream(stream_id)
            if stream is not None:
                opts.progress_stream = stream_id
                reader = asyncio.create_task(_read_progress(stream, progress))
        try:
            await self._conn.unary(self._stub.Transfer, pb.TransferRequest(
                source=source, destination=destination, options=opts))
        except errors.Unimplemented as exc:
            raise errors.Unimplemented(
                f"the daemon at {self._conn.address} has no Transfer service "
                f"(containerd 1.7+ or ctrd needed to pull): {exc}") from None
        finally:
            if reader is not None:
                # The daemon closes the stream when done; give it a moment to drain.
                try:
                    await asyncio.wait_for(asyncio.shield(reader), 2)
                except (asyncio.TimeoutError, errors.CtrdError):
                    pass
                reader.cancel()
            if stream is not None:
                stream.cancel()

    async def _open_stream(self, stream_id: str):
        """A Streaming call registered under ``stream_id``; None when the daemon has
        no Streaming service (progress is then simply not shown)."""
        call = self._streaming.Stream(metadata=self._conn.metadata())
        try:
            await call.write(protoutil.pack(streaming_pb2.StreamInit(id=stream_id)))
            ack = await call.read()  # the daemon confirms once the stream is registered
        except grpc.aio.AioRpcError as exc:
            call.cancel()
            if exc.code() == grpc.StatusCode.UNIMPLEMENTED:
                return None
            raise translate(exc, self._conn.address) from None
        if ack is grpc.aio.EOF:
            call.cancel()
            return None
        return call


async def _read_progress(call, progress: Callable[[Progress], None]) -> None:
    async for item in _messages(call):
        try:
            msg = protoutil.unpack(item)
        except errors.InvalidArgument:
            continue
        if isinstance(msg, progress_pb2.Progress):
            progress(Progress(msg.event, msg.name, tuple(msg.parents), msg.progress, msg.total))


async def _messages(call) -> AsyncIterator[any_pb2.Any]:
    try:
        while (item := await call.read()) is not grpc.aio.EOF:
            yield item
    except grpc.aio.AioRpcError:
        return
