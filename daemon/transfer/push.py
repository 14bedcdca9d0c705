"""Pushing an image from the local stores to a registry.

Bottom-up: layers and configs first (concurrently, bounded; skipped when the registry
has them, mounted from another repository of the same registry when the content's
``distribution.source`` label says where it came from), then manifests by digest,
then the root under the reference's tag. A registry never sees a manifest before
everything it points to.
"""
from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import structlog

from ctrd.errors import InvalidArgument, NotFound
from ctrd.oci import mediatypes
from ctrd.oci.descriptor import Descriptor

from ..metadata.images import Image
from ..remotes.platforms import Matcher
from ..remotes.registry import Repository
from .progress import Tracker, ref_key
from .pull import DISTRIBUTION_SOURCE, RegistryJob, Stores, first_error

log = structlog.get_logger()


@dataclass
class PushOptions:
    platforms: Matcher = Matcher(())  # empty: every manifest the index names
    max_concurrent: int = 3
    # Foreign/non-distributable layers stay local unless asked for, as in containerd.
    include_nondistributable: bool = False


class Pusher(RegistryJob):
    def __init__(self, stores: Stores, namespace: str, repo: Repository, options: PushOptions,
                 tracker: Tracker) -> None:
        super().__init__(stores, namespace, repo, tracker, options.max_concurrent)
        self.options = options

    async def run(self, image: Image) -> None:
        target = image.target
        root = Descriptor(media_type=target.media_type, digest=target.digest, size=target.size)
        self.tracker.emit(f"Pushing to {self.repo.ref}")
        try:
            async with asyncio.TaskGroup() as group:
                self._group = group
                await self._node(root, None, tag=self.repo.ref.tag)
        except BaseExceptionGroup as exc:
            raise first_error(exc) from None
        self.tracker.emit(f"Completed push to {self.repo.ref}")

    async def _read(self, desc: Descriptor) -> bytes:
        chunks = [c async for c in await self.stores.content.read(self.namespace, desc.digest)]
        return b"".join(chunks)

    async def _node(self, desc: Descriptor, parent: Descriptor | None, tag: str = "") -> None:
        self.tracker.add(desc, parent)
        data = await self._read(desc)
        try:
            body: dict[str, Any] = json.loads(data)
        except ValueError as exc:
            raise InvalidArgument(f"{desc.digest}: not JSON: {exc}") from None
        if mediatypes.is_index(desc.media_type):
            children = [Descriptor.from_json(m) for m in body.get("manifests") or []]
            chosen = [c for c in children if self.options.platforms.matches_all
                      or self.options.platforms.match(c.platform)]
            async with asyncio.TaskGroup() as group:
                for child in chosen:
                    group.create_task(self._node(child, desc))
        elif mediatypes.is_manifest(desc.media_type):
            blobs = [Descriptor.from_json(body["config"])]
            blobs += [Descriptor.from_json(layer) for layer in body.get("layers") or []]
            waits = []
            for blob in blobs:
                if mediatypes.is_nondistributable(blob.media_type) and \
                        not self.options.include_nondistributable:
                    continue
                self.tracker.add(blob, desc)
                waits.append(self._blob(blob))
            await asyncio.gather(*waits)
        else:
            raise InvalidArgument(f"{desc.digest}: cannot push media type {desc.media_type!r}")
        async with self._limit:
            await self.repo.push_manifest(desc, data, tag)
        self.tracker.done(desc)

    async def _mount_sources(self, desc: Descriptor) -> tuple[str, ...]:
        try:
            info = await self.stores.content.info(self.namespace, desc.digest)
        except NotFound:
            raise NotFound(f"{desc.digest}: not in the content store; pull it first") from None
        value = info.labels.get(f"{DISTRIBUTION_SOURCE}.{self.repo.ref.domain}", "")
        return tuple(r for r in value.split(",") if r and r != self.repo.ref.path)

    async def _move_blob(self, desc: Descriptor) -> None:
        async with self._limit:
            sources = await self._mount_sources(desc)

            async def chunks() -> AsyncIterator[bytes]:
                sent = 0
                async for chunk in await self.stores.content.read(self.namespace, desc.digest):
                    sent += len(chunk)
                    self.tracker.moved(desc, sent)
                    yield chunk

            result = await self.repo.push_blob(desc, chunks, mount_from=sources)
        if result.how == "exists":
            self.tracker.done(desc, existed=True)
        elif result.how == "mounted":
            self.tracker.emit("mounted", ref_key(desc), parents=self.tracker.parents(desc),
                              progress=desc.size, total=desc.size)
        else:
            self.tracker.done(desc)
