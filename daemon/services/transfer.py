"""containerd.services.transfer.v1.Transfer (containerd 1.7's API) over the local transfer.

Source and destination arrive as Any: an ``OCIRegistry`` and an ``ImageStore`` in
either order mean pull or push. Progress goes to the caller over the stream named in
``options.progress_stream``; registry credentials, when the caller offers them, are
asked for over ``resolver.auth_stream`` (an ``AuthRequest`` out, an ``AuthResponse`` back).
"""
from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import structlog
from google.protobuf import empty_pb2

from ctrd import protoutil, reference
from ctrd.api.containerd.services.transfer.v1 import transfer_pb2 as pb
from ctrd.api.containerd.types.transfer import (
    imagestore_pb2,
    importexport_pb2,
    progress_pb2,
    registry_pb2,
)
from ctrd.errors import InvalidArgument, Unavailable, Unimplemented
from ctrd.oci.descriptor import Platform

from ..plugin import INTERNAL, TRANSFER, InitContext
from ..remotes.auth import Credentials, CredentialsFunc
from ..remotes.platforms import Matcher, host
from ..remotes.resolver import Resolver
from ..transfer.archive_export import ExportOptions
from ..transfer.archive_import import ImageReference, ImportOptions
from ..transfer.local import LocalTransfer
from ..transfer.progress import Progress
from ..transfer.pull import PullOptions, UnpackTarget
from ..transfer.push import PushOptions
from ..transfer.streams import Stream, StreamManager, receive_data, send_data
from .context import namespace
from .interceptor import Registrar

log = structlog.get_logger()


class _ProgressSender:
    """Queues progress events and sends them in order on the caller's stream."""

    def __init__(self, stream: Stream) -> None:
        self.stream = stream
        self.queue: asyncio.Queue[Progress | None] = asyncio.Queue()
        self.task = asyncio.create_task(self._run())

    def __call__(self, item: Progress) -> None:
        self.queue.put_nowait(item)

    async def _run(self) -> None:
        while (item := await self.queue.get()) is not None:
            msg = progress_pb2.Progress(event=item.event, name=item.name,
                                        parents=list(item.parents), progress=item.progress,
                                        total=item.total)
            try:
                await self.stream.send(msg)
            except (Unavailable, RuntimeError) as exc:
                log.info("progress stream gone", error=str(exc))
                return

    async def close(self) -> None:
        self.queue.put_nowait(None)
        await self.task
        self.stream.close()


def _stream_credentials(stream: Stream, ref: str) -> CredentialsFunc:
    lock = asyncio.Lock()

    async def lookup(host: str) -> Credentials | None:
        # One question at a time: answers come back in order on the same stream.
        async with lock:
            await stream.send(registry_pb2.AuthRequest(host=host, reference=ref))
            try:
                answer = await stream.recv()
            except EOFError:
                return None
        if not isinstance(answer, registry_pb2.AuthResponse):
            raise InvalidArgument(f"auth stream: expected AuthResponse, got {type(answer)}")
        if answer.authType == registry_pb2.CREDENTIALS:
            return Credentials(answer.username, answer.secret)
        if answer.authType == registry_pb2.REFRESH:
            return Credentials("", answer.secret)
        return None

    return lookup


def _platform(pb_platform) -> Platform:
    return Platform(pb_platform.os, pb_platform.architecture, pb_platform.variant)


class TransferService:
    def __init__(self, local: LocalTransfer, streams: StreamManager) -> None:
        self.local = local
        self.streams = streams

    def register(self, server: Registrar) -> None:
        server.add_service(pb.DESCRIPTOR.services_by_name["Transfer"], self)

    def _resolver(self, ns: str, registry: registry_pb2.OCIRegistry) -> Resolver:
        res = registry.resolver
        credentials = None
        headers: dict[str, str] = {}
        if registry.HasField("resolver"):
            if res.auth_stream:
                credentials = _stream_credentials(self.streams.get(ns, res.auth_stream),
                                                  registry.reference)
            headers = dict(res.headers)
        return self.local.resolver(host_dir=res.host_dir, default_scheme=res.default_scheme,
                                   headers=headers, credentials=credentials)

    async def Transfer(self, request: pb.TransferRequest, context) -> empty_pb2.Empty:
        ns = namespace(context)
        source = protoutil.unpack(request.source)
        destination = protoutil.unpack(request.destination)
        progress: _ProgressSender | None = None
        if request.HasField("options") and request.options.progress_stream:
            progress = _ProgressSender(self.streams.get(ns, request.options.progress_stream))
        try:
            action = self._action(ns, source, destination)
            await action(progress)
        finally:
            if progress is not None:
                await progress.close()
        return empty_pb2.Empty()

    def _action(self, ns: str, source, destination
                ) -> Callable[[_ProgressSender | None], Awaitable[None]]:
        if isinstance(source, registry_pb2.OCIRegistry) and \
                isinstance(destination, imagestore_pb2.ImageStore):
            return lambda progress: self._pull(ns, source, destination, progress)
        if isinstance(source, imagestore_pb2.ImageStore) and \
                isinstance(destination, registry_pb2.OCIRegistry):
            return lambda progress: self._push(ns, source, destination, progress)
        if isinstance(source, importexport_pb2.ImageImportStream):
            if isinstance(destination, imagestore_pb2.ImageStore):
                return lambda progress: self._import(ns, source, destination, progress)
            if isinstance(destination, importexport_pb2.ImageExportStream):
                return lambda progress: self._echo(ns, source, destination)
        if isinstance(source, imagestore_pb2.ImageStore) and \
                isinstance(destination, importexport_pb2.ImageExportStream):
            return lambda progress: self._export(ns, source, destination, progress)
        raise Unimplemented(f"method Transfer not implemented for "
                            f"{type(source).DESCRIPTOR.full_name} to "
                            f"{type(destination).DESCRIPTOR.full_name}")

    async def _pull(self, ns: str, source: registry_pb2.OCIRegistry,
                    store: imagestore_pb2.ImageStore, progress: _ProgressSender | None) -> None:
        ref = reference.normalize(source.reference)
        options = PullOptions(
            platforms=Matcher.of([_platform(p) for p in store.platforms]),
            unpack=[UnpackTarget(_platform(u.platform), u.snapshotter) for u in store.unpacks],
            image_name=store.name or source.reference,
            extra_names=[r.name for r in store.extra_references
                         if not r.is_prefix and not r.add_digest],
            labels=dict(store.labels), manifest_limit=store.manifest_limit)
        await self.local.pull(ns, ref, options, resolver=self._resolver(ns, source),
                              progress=progress)

    async def _push(self, ns: str, store: imagestore_pb2.ImageStore,
                    destination: registry_pb2.OCIRegistry,
                    progress: _ProgressSender | None) -> None:
        image = await self.local.stores.images.get(ns, store.name)
        ref = reference.normalize(destination.reference)
        options = PushOptions(platforms=Matcher.of([_platform(p) for p in store.platforms]))
        await self.local.push(ns, image, ref, options,
                              resolver=self._resolver(ns, destination), progress=progress)


    async def _import(self, ns: str, source: importexport_pb2.ImageImportStream,
                      store: imagestore_pb2.ImageStore, progress: _ProgressSender | None) -> None:
        stream = self.streams.get(ns, source.stream)
        options = ImportOptions(
            image_name=store.name,
            references=[ImageReference(r.name, r.is_prefix, r.allow_overwrite, r.add_digest,
                                       r.skip_named_digest) for r in store.extra_references],
            labels=dict(store.labels),
            platforms=Matcher.of([_platform(p) for p in store.platforms]),
            manifest_limit=store.manifest_limit,
            unpack=[UnpackTarget(_platform(u.platform), u.snapshotter) for u in store.unpacks],
            force_compress=source.force_compress)
        chunks = receive_data(stream)
        try:
            await self.local.import_archive(ns, chunks, options, progress=progress)
        finally:
            await chunks.aclose()
            # Ends the client's side too: a sender still waiting for a window stops.
            stream.close()

    async def _export(self, ns: str, store: imagestore_pb2.ImageStore,
                      destination: importexport_pb2.ImageExportStream,
                      progress: _ProgressSender | None) -> None:
        stream = self.streams.get(ns, destination.stream)
        names = [store.name, *store.export_images,
                 *(r.name for r in store.extra_references if not r.is_prefix)]
        wanted = [_platform(p) for p in destination.platforms] or [host()]
        options = ExportOptions(
            names=[n for n in names if n], platforms=Matcher.of(wanted),
            all_platforms=destination.all_platforms,
            skip_docker_manifest=destination.skip_docker_manifest,
            skip_non_distributable=destination.skip_non_distributable)
        try:
            await self.local.export_archive(ns, options, lambda data: send_data(stream, data),
                                            progress=progress)
        finally:
            stream.close()

    async def _echo(self, ns: str, source: importexport_pb2.ImageImportStream,
                    destination: importexport_pb2.ImageExportStream) -> None:
        """Bytes in, the same bytes out (containerd keeps this for testing streams)."""
        inbound = self.streams.get(ns, source.stream)
        outbound = self.streams.get(ns, destination.stream)
        chunks = receive_data(inbound)
        try:
            await send_data(outbound, chunks)
        finally:
            await chunks.aclose()
            inbound.close()
            outbound.close()


def init(ctx: InitContext) -> TransferService:
    return TransferService(ctx.get(TRANSFER, "local"), ctx.get(INTERNAL, "streaming"))
