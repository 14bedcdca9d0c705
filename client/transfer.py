"""Pulling images and moving image archives through containerd 1.7's Transfer service.

The daemon does the work (resolve, fetch, unpack); the client names a source
(an OCI registry reference or an archive stream) and a destination (the image store
or an archive stream), and may open a side stream through the Streaming service on
which the daemon reports progress. Archive bytes travel over another such stream as
``Data`` messages, the receiver granting the sender ``WindowUpdate`` byte allowances.
"""
from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import grpc
from google.protobuf import any_pb2

from ctrd import errors, protoutil
from ctrd.api.containerd.services.streaming.v1 import streaming_pb2
from ctrd.api.containerd.services.streaming.v1 import streaming_pb2_grpc
from ctrd.api.containerd.services.transfer.v1 import transfer_pb2 as pb
from ctrd.api.containerd.services.transfer.v1 import transfer_pb2_grpc as pb_grpc
from ctrd.api.containerd.types.transfer import (
    imagestore_pb2,
    importexport_pb2,
    progress_pb2,
    registry_pb2,
)
from ctrd.api.containerd.types.transfer import streaming_pb2 as data_pb2

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


@dataclass(frozen=True)
class ArchiveImportOptions:
    # Names for images the archive names by tag only (``base:tag``); "" keeps the
    # archive's own full names and skips tag-only ones.
    base_name: str = ""
    unpack: bool = True
    snapshotter: str = DEFAULT_SNAPSHOTTER
    platforms: tuple[Platform, ...] = field(default_factory=lambda: (Platform.host(),))
    labels: dict[str, str] = field(default_factory=dict)
    force_compress: bool = False


@dataclass(frozen=True)
class ArchiveExportOptions:
    platforms: tuple[Platform, ...] = ()  # empty: the daemon's own platform
    all_platforms: bool = False
    skip_docker_manifest: bool = False
    skip_non_distributable: bool = False


# The streaming protocol's sizes, as containerd's: 32 KiB messages in 64 KiB windows.
MAX_MESSAGE = 32 << 10
WINDOW = 2 * MAX_MESSAGE
# What we grant a daemon sending us a file. HTTP/2's own flow control already bounds
# what is in flight, so this window can be large, and a large one is granted rarely:
# grpcio's client fails a call whose last write raced with the daemon ending it, and
# then drops the messages not yet read, so every grant near the end is a risk.
RECEIVE_WINDOW = 16 << 20
TAR_MEDIA_TYPE = "application/x-tar"


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

    async def import_archive(self, source: str | Path | BinaryIO,
                             options: ArchiveImportOptions = ArchiveImportOptions(),
                             progress: Callable[[Progress], None] | None = None) -> list[str]:
        """Send an OCI or docker archive (a path or a binary file) to the daemon's image
        store; returns the names of the images it saved."""
        saved: list[str] = []

        def watch(item: Progress) -> None:
            if item.event == "saved" and item.name:
                saved.append(item.name)
            if progress is not None:
                progress(item)

        references = []
        if options.base_name:
            references.append(imagestore_pb2.ImageReference(
                name=options.base_name, is_prefix=True, allow_overwrite=True))
        unpacks = [imagestore_pb2.UnpackConfiguration(platform=p.to_pb(),
                                                      snapshotter=options.snapshotter)
                   for p in options.platforms] if options.unpack else []
        destination = imagestore_pb2.ImageStore(
            labels=options.labels, platforms=[p.to_pb() for p in options.platforms],
            extra_references=references, unpacks=unpacks)
        await self._require()
        stream_id = f"import-{secrets.token_hex(8)}"
        call = await self._open_stream(stream_id)
        if call is None:
            raise errors.Unimplemented(f"the daemon at {self._conn.address} has no Streaming "
                                       "service to send the archive on")
        opened = None
        if isinstance(source, (str, Path)):
            opened = source = await asyncio.to_thread(open, source, "rb")
        sender = asyncio.create_task(_send_file(call, source))
        try:
            request = importexport_pb2.ImageImportStream(
                stream=stream_id, media_type=TAR_MEDIA_TYPE,
                force_compress=options.force_compress)
            await self.transfer(protoutil.pack(request), protoutil.pack(destination), watch)
        finally:
            sender.cancel()
            call.cancel()
            if opened is not None:
                opened.close()
        return saved

    async def export_archive(self, names: list[str], target: str | Path | BinaryIO,
                             options: ArchiveExportOptions = ArchiveExportOptions(),
                             progress: Callable[[Progress], None] | None = None) -> None:
        """Have the daemon write the named images as an OCI archive into ``target``
        (a path, removed again if the export fails, or a binary file)."""
        if not names:
            raise errors.InvalidArgument("name at least one image to export")
        await self._require()
        stream_id = f"export-{secrets.token_hex(8)}"
        call = await self._open_stream(stream_id)
        if call is None:
            raise errors.Unimplemented(f"the daemon at {self._conn.address} has no Streaming "
                                       "service to receive the archive on")
        path = Path(target) if isinstance(target, (str, Path)) else None
        out: BinaryIO = await asyncio.to_thread(open, path, "wb") if path else target
        receiver = asyncio.create_task(_receive_file(call, out))
        ok = False
        try:
            source = imagestore_pb2.ImageStore(name=names[0], export_images=names[1:])
            destination = importexport_pb2.ImageExportStream(
                stream=stream_id, media_type=TAR_MEDIA_TYPE,
                platforms=[p.to_pb() for p in options.platforms],
                all_platforms=options.all_platforms,
                skip_docker_manifest=options.skip_docker_manifest,
                skip_non_distributable=options.skip_non_distributable)
            await self.transfer(protoutil.pack(source), protoutil.pack(destination), progress)
            # The daemon closes the stream after the last byte: wait for all of them.
            await asyncio.wait_for(receiver, 60)
            ok = True
        finally:
            receiver.cancel()
            call.cancel()
            if path is not None:
                out.close()
                if not ok:
                    await asyncio.to_thread(lambda: path.unlink(missing_ok=True))

    async def _require(self) -> None:
        if not await Introspection(self._conn).has_plugin("io.containerd.grpc.v1", "transfer"):
            raise errors.Unimplemented(
                f"the daemon at {self._conn.address} has no Transfer service "
                "(containerd 1.7+ or ctrd needed)")

    async def transfer(self, source: any_pb2.Any, destination: any_pb2.Any,
                       progress: Callable[[Progress], None] | None = None) -> None:
        # Ask first: against a daemon without the service, the progress stream's first
        # write can lose the race with the rejection and fail as INTERNAL, not UNIMPLEMENTED.
        await self._require()
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


async def _send_file(call, source: BinaryIO) -> None:
    """Send ``source`` as Data messages, never more than the daemon has granted."""
    try:
        await _send_windowed(call, source)
    except grpc.aio.AioRpcError:
        pass  # the stream ended early; the Transfer call reports the reason


async def _send_windowed(call, source: BinaryIO) -> None:
    granted = 0
    while True:
        while granted <= 0:
            item = await call.read()
            if item is grpc.aio.EOF:
                return  # the daemon stopped reading (it failed); the Transfer call says why
            msg = protoutil.unpack(item)
            if isinstance(msg, data_pb2.WindowUpdate):
                granted += msg.update
        chunk = await asyncio.to_thread(source.read, min(MAX_MESSAGE, granted))
        if not chunk:
            break
        await call.write(protoutil.pack(data_pb2.Data(data=chunk)))
        granted -= len(chunk)
    await call.done_writing()


async def _receive_file(call, out: BinaryIO) -> None:
    """Write Data messages to ``out`` until the daemon ends the stream, granting windows."""
    window = 0
    while True:
        if window < RECEIVE_WINDOW // 2 and not call.done():
            try:
                grant = RECEIVE_WINDOW - window
                await call.write(protoutil.pack(data_pb2.WindowUpdate(update=grant)))
                window += grant
            except (grpc.aio.AioRpcError, grpc.aio.UsageError):
                pass  # the daemon already closed its side; read what is left
        item = await call.read()
        if item is grpc.aio.EOF:
            await asyncio.to_thread(out.flush)
            return
        msg = protoutil.unpack(item)
        if isinstance(msg, data_pb2.Data):
            await asyncio.to_thread(out.write, msg.data)
            window -= len(msg.data)


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
