"""Pulling an image from a registry into the content store, unpacking as layers arrive.

The manifest tree is walked top-down: each index or manifest is fetched, checked and
committed with the garbage-collection labels that name its children, then the
children are fetched. Config and layers download concurrently (bounded); each
manifest chosen for unpacking has a task that applies its layers strictly in order,
each as soon as it (and all below it) are committed, so unpacking overlaps the
download of later layers instead of waiting for all of them. Everything happens
under a lease, so nothing is collected half-way, and the image record is written
last, once all content (and unpacked snapshot) is in place.
"""
from __future__ import annotations

import asyncio
import json
import secrets
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

import structlog

from ctrd.api.containerd.events import image_pb2 as image_events
from ctrd.errors import (
    AlreadyExists,
    CtrdError,
    DataLoss,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    Unavailable,
)
from ctrd.oci import mediatypes
from ctrd.oci.descriptor import Descriptor, Platform

from ..metadata.images import Descriptor as ImageTarget
from ..metadata.images import Image
from ..metadata.leases import EXPIRE_LABEL
from ..remotes.platforms import Matcher
from ..remotes.registry import Repository
from .jsonblob import read_json
from .progress import Tracker, ref_key
from .unpacking import UnpackStarter, UnpackTarget, config_platform, snapshotter_for, unpack_layers

log = structlog.get_logger()

GC_REF_CONTENT = "containerd.io/gc.ref.content"
DISTRIBUTION_SOURCE = "containerd.io/distribution.source"
# Writes to the content store go in chunks of about this size (one thread hop each).
WRITE_CHUNK = 1 << 20
TEMP_LEASE_LIFETIME = timedelta(hours=24)


@dataclass
class PullOptions:
    # Empty: every platform of an index (containerd's platforms.All).
    platforms: Matcher = field(default_factory=lambda: Matcher(()))
    unpack: Sequence[UnpackTarget] = ()
    image_name: str = ""  # "" means the reference as given
    extra_names: Sequence[str] = ()
    labels: dict[str, str] = field(default_factory=dict)
    manifest_limit: int = 0
    max_concurrent: int = 3
    lease: str | None = None  # the caller's lease; else a temporary one is used


@dataclass
class Stores:
    """The daemon objects a transfer reads and writes."""

    content: Any  # metadata.content.ContentService
    images: Any  # metadata.images.ImageStore
    leases: Any  # metadata.leases.LeaseStore
    events: Any = None  # events.exchange.Exchange
    unpack: UnpackStarter | None = None
    default_snapshotter: str = "overlayfs"


@asynccontextmanager
async def lease_for(stores: Stores, namespace: str, given: str | None) -> AsyncIterator[str]:
    """The caller's lease, or a temporary one deleted (releasing its holds) at the end."""
    if given:
        yield given
        return
    lease_id = f"transfer-{secrets.token_hex(8)}"
    expire = datetime.now(timezone.utc) + TEMP_LEASE_LIFETIME
    await stores.leases.create(namespace, lease_id,
                               {EXPIRE_LABEL: expire.strftime("%Y-%m-%dT%H:%M:%SZ")})
    try:
        yield lease_id
    finally:
        try:
            await stores.leases.delete(namespace, lease_id)
        except NotFound:
            pass


def first_error(exc: BaseException) -> BaseException:
    """The most telling error inside a (nested) ExceptionGroup from a task group."""
    while isinstance(exc, BaseExceptionGroup):
        ours = [e for e in exc.exceptions if isinstance(e, CtrdError | BaseExceptionGroup)]
        exc = (ours or list(exc.exceptions))[0]
    return exc


class _Buffered:
    """Collects small network reads into large content-store writes."""

    def __init__(self, writer: Any, desc: Descriptor, tracker: Tracker, offset: int) -> None:
        self.writer = writer
        self.desc = desc
        self.tracker = tracker
        self.offset = offset
        self._chunks: list[bytes] = []
        self._pending = 0

    async def __call__(self, chunk: bytes) -> None:
        self._chunks.append(chunk)
        self._pending += len(chunk)
        if self._pending >= WRITE_CHUNK:
            await self.flush()

    async def flush(self) -> None:
        if not self._chunks:
            return
        data = b"".join(self._chunks)
        self._chunks, self._pending = [], 0
        await self.writer.write(data)
        self.offset += len(data)
        self.tracker.moved(self.desc, self.offset)


class RegistryJob:
    """What a pull and a push share: one repository, and blobs moved concurrently (at most
    ``max_concurrent`` at a time), each once even when several manifests name it."""

    def __init__(self, stores: Stores, namespace: str, repo: Repository, tracker: Tracker,
                 max_concurrent: int) -> None:
        self.stores = stores
        self.namespace = namespace
        self.repo = repo
        self.tracker = tracker
        self._limit = asyncio.Semaphore(max(1, max_concurrent))
        self._blobs: dict[str, asyncio.Task[None]] = {}
        self._group: asyncio.TaskGroup  # set by run() around the whole transfer

    def _blob(self, desc: Descriptor) -> asyncio.Task[None]:
        """The (shared) transfer task of one blob; several manifests may share a layer."""
        task = self._blobs.get(desc.digest)
        if task is None:
            task = self._group.create_task(self._move_blob(desc))
            self._blobs[desc.digest] = task
        return task

    async def _move_blob(self, desc: Descriptor) -> None:
        raise NotImplementedError


class Puller(RegistryJob):
    """One pull: from ``repo`` into the stores of ``namespace``."""

    def __init__(self, stores: Stores, namespace: str, repo: Repository, options: PullOptions,
                 tracker: Tracker) -> None:
        super().__init__(stores, namespace, repo, tracker, options.max_concurrent)
        self.options = options
        self.lease = ""
        self._source = {f"{DISTRIBUTION_SOURCE}.{repo.ref.domain}": repo.ref.path}

    async def run(self) -> list[Image]:
        ref = self.repo.ref
        self.tracker.emit(f"Resolving from {ref}")
        root = await self.repo.resolve()
        if mediatypes.base(root.media_type) == mediatypes.DOCKER_MANIFEST_SCHEMA1:
            raise InvalidArgument("schema 1 image manifests are no longer supported")
        self.tracker.emit(f"Pulling from {ref}")
        self.tracker.emit("fetching image content", self.tracker.root)
        async with lease_for(self.stores, self.namespace, self.options.lease) as lease:
            self.lease = lease
            try:
                async with asyncio.TaskGroup() as group:
                    self._group = group
                    await self._node(root, None, None)
            except BaseExceptionGroup as exc:
                raise first_error(exc) from None
            images = await self._store_images(root)
        for image in images:
            self.tracker.emit("saved", image.name)
        self.tracker.emit(f"Completed pull from {ref}")
        return images

    # ---- the manifest tree

    async def _node(self, desc: Descriptor, parent: Descriptor | None,
                    platform: Platform | None) -> None:
        self.tracker.add(desc, parent)
        if not (mediatypes.is_index(desc.media_type) or mediatypes.is_manifest(desc.media_type)):
            raise InvalidArgument(f"{desc.digest}: unsupported root media type {desc.media_type!r}")
        async with self._limit:
            data = await self.repo.fetch_manifest(desc)
        try:
            body = json.loads(data)
        except ValueError as exc:
            raise InvalidArgument(f"{desc.digest}: manifest is not JSON: {exc}") from None
        if not isinstance(body, dict):
            raise InvalidArgument(f"{desc.digest}: manifest is not a JSON object")
        declared = body.get("mediaType")
        if declared and mediatypes.base(declared) != mediatypes.base(desc.media_type) \
                and desc.media_type:
            raise InvalidArgument(f"{desc.digest}: media type {declared!r} in the manifest "
                                  f"differs from {desc.media_type!r} in its descriptor")
        if mediatypes.is_index(desc.media_type):
            await self._index(desc, data, body)
        else:
            await self._manifest(desc, data, body, platform)

    async def _index(self, desc: Descriptor, data: bytes, body: dict[str, Any]) -> None:
        entries = [Descriptor.from_json(m) for m in body.get("manifests") or []]
        matcher = self.options.platforms
        chosen = [(matcher.rank(e.platform), i, e) for i, e in enumerate(entries)
                  if matcher.matches_all or matcher.match(e.platform)]
        chosen.sort(key=lambda item: (item[0], item[1]))
        if self.options.manifest_limit:
            chosen = chosen[: self.options.manifest_limit]
        children = [e for _, _, e in sorted(chosen, key=lambda item: item[1])]
        if not children:
            wanted = ", ".join(str(p) for p in matcher.wanted) or "any"
            raise NotFound(f"{self.repo.ref}: no image for platform {wanted} in the index")
        labels = {f"{GC_REF_CONTENT}.m.{i}": c.digest for i, c in enumerate(children)}
        await self._commit_bytes(desc, data, labels)
        self.tracker.done(desc)
        for child in children:
            self.tracker.add(child, desc)
        async with asyncio.TaskGroup() as group:
            for child in children:
                kind = child.media_type
                if mediatypes.is_index(kind) or mediatypes.is_manifest(kind):
                    group.create_task(self._node(child, desc, child.platform))

    async def _manifest(self, desc: Descriptor, data: bytes, body: dict[str, Any],
                        platform: Platform | None) -> None:
        try:
            config = Descriptor.from_json(body["config"])
            layers = [Descriptor.from_json(layer) for layer in body.get("layers") or []]
        except (KeyError, TypeError) as exc:
            raise InvalidArgument(f"{desc.digest}: manifest without {exc}") from None
        labels = {f"{GC_REF_CONTENT}.config": config.digest}
        labels.update({f"{GC_REF_CONTENT}.l.{i}": layer.digest for i, layer in enumerate(layers)})
        await self._commit_bytes(desc, data, labels)
        self.tracker.done(desc)
        for blob in (config, *layers):
            self.tracker.add(blob, desc)
        # Layers start downloading at once; the config is small and needed to unpack.
        for layer in layers:
            self._blob(layer)
        await self._blob(config)
        target = await self._unpack_target(config, platform)
        if target is None:
            await asyncio.gather(*(self._blob(layer) for layer in layers))
            return
        await self._unpack(desc, config, layers, target)

    async def _unpack_target(self, config: Descriptor, platform: Platform | None) -> str | None:
        if not self.options.unpack or self.stores.unpack is None:
            return None
        if platform is None:
            platform = config_platform(await self._config_json(config))
        return snapshotter_for(self.options.unpack, platform, self.stores.default_snapshotter)

    async def _unpack(self, manifest: Descriptor, config: Descriptor, layers: list[Descriptor],
                      snapshotter: str) -> None:
        assert self.stores.unpack is not None  # _unpack_target chose no snapshotter otherwise
        await unpack_layers(self.stores.unpack, self.namespace, self.lease, self.tracker,
                            manifest, config, await self._config_json(config), layers,
                            snapshotter, before_layer=self._blob)

    async def _config_json(self, config: Descriptor) -> dict[str, Any]:
        return await read_json(self.stores.content, self.namespace, config.digest,
                               f"{config.digest}: config")

    # ---- content

    async def _commit_bytes(self, desc: Descriptor, data: bytes, labels: dict[str, str]) -> None:
        labels = {**labels, **self._source}
        delay = 0.05
        while True:
            try:
                await self.stores.content.write_blob(self.namespace, data, desc.digest,
                                                     labels=labels, lease=self.lease,
                                                     ref=ref_key(desc))
                return
            except Unavailable:
                # Another pull is committing the same manifest; let it finish first.
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)

    async def _move_blob(self, desc: Descriptor) -> None:
        if desc.size < 0:
            raise InvalidArgument(f"{desc.digest}: negative size")
        async with self._limit:
            existed = await self._download(desc)
        self.tracker.done(desc, existed)

    async def _download(self, desc: Descriptor) -> bool:
        """Fetch into the content store; True if the namespace already had the blob."""
        cs = self.stores.content
        ref = ref_key(desc)
        restarted = False
        while True:
            writer = await self._open_writer(desc, ref)
            if writer is None:
                await cs.update(self.namespace, desc.digest, self._source,
                                [f"labels.{k}" for k in self._source])
                return True
            verify_failed: FailedPrecondition | None = None
            try:
                try:
                    offset = (await writer.status()).offset
                    if offset > desc.size:
                        await writer.truncate()
                        offset = 0
                    if offset < desc.size or desc.size == 0:
                        sink = _Buffered(writer, desc, self.tracker, offset)
                        await self.repo.fetch_blob(desc, sink, offset=offset)
                        await sink.flush()
                    try:
                        await writer.commit(desc.size, desc.digest, self._source)
                    except FailedPrecondition as exc:
                        verify_failed = exc
                finally:
                    await writer.close()
            except AlreadyExists:
                return False
            except DataLoss:
                # Never leave bytes that failed verification around to be resumed.
                await self._abort(ref)
                raise
            if verify_failed is None:
                return False
            # The bytes did not add up (a partial ingest from an earlier try, resumed
            # without a hash of its start): drop them and start over, once.
            await self._abort(ref)
            if restarted:
                raise DataLoss(f"{desc.digest}: content failed verification: {verify_failed}")
            restarted = True
            log.warning("ingest failed verification; restarting", ref=ref,
                        error=str(verify_failed))

    async def _open_writer(self, desc: Descriptor, ref: str) -> Any | None:
        """A writer for ``ref``, or None if the content is already there.

        If another pull in this namespace is writing the same blob, wait for it.
        """
        delay = 0.05
        while True:
            try:
                return await self.stores.content.writer(
                    self.namespace, ref, total=desc.size, expected=desc.digest, lease=self.lease)
            except AlreadyExists:
                return None
            except Unavailable:
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)

    async def _abort(self, ref: str) -> None:
        try:
            await self.stores.content.abort(self.namespace, ref)
        except NotFound:
            pass

    # ---- image records

    async def _store_images(self, root: Descriptor) -> list[Image]:
        names = [self.options.image_name or str(self.repo.ref), *self.options.extra_names]
        target = ImageTarget(media_type=root.media_type, digest=root.digest, size=root.size)
        return [await store_image(self.stores, self.namespace, name, target, self.options.labels)
                for name in dict.fromkeys(names)]


async def store_image(stores: Stores, namespace: str, name: str, target: ImageTarget,
                      labels: dict[str, str]) -> Image:
    """Create the image record, or point an existing one at the new target."""
    image = Image(name=name, target=target, labels=dict(labels))
    while True:
        try:
            created = await stores.images.create(namespace, image)
            topic, event = "/images/create", image_events.ImageCreate(
                name=name, labels=created.labels)
            result = created
        except AlreadyExists:
            try:
                result = await stores.images.update(namespace, image, ["target", "labels"]
                                                    if labels else ["target"])
            except NotFound:
                continue  # deleted in between: create it again
            topic, event = "/images/update", image_events.ImageUpdate(
                name=name, labels=result.labels)
        if stores.events is not None:
            await stores.events.publish(namespace, topic, event)
        return result

