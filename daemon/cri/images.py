"""CRI's view of images: one image per config digest, whatever names point at it.

containerd's CRI plugin names an image three ways in the image store: the reference
it was pulled by (``docker.io/library/busybox:1.36``), the repository with the
manifest digest (``docker.io/library/busybox@sha256:...``) and the image ID, which is
the config digest (``sha256:...``). Images created by other clients in the
namespace (``ctr -n k8s.io images import``) are CRI images too; they are grouped
by the config digest their target resolves to for this host's platform.
"""
from __future__ import annotations

import asyncio
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from ctrd import reference
from ctrd.api.containerd.events import image_pb2 as ev
from ctrd.errors import CtrdError, InvalidArgument, NotFound
from ctrd.oci.descriptor import Descriptor

from ..metadata.images import Image, ImageStore
from ..remotes import platforms
from ..remotes.auth import Credentials
from ..transfer.jsonblob import read_json
from ..transfer.pull import PullOptions
from ..transfer.unpacking import UnpackTarget
from ..unpack import Unpacker, chain_ids
from .config import NAMESPACE

log = structlog.get_logger()

# containerd marks the names it creates for CRI with this label.
MANAGED_LABEL = "io.cri-containerd.image"
USAGE_TTL = 10.0
_HEX_PREFIX = re.compile(r"^sha256:[a-f0-9]{1,64}$")


@dataclass
class ImageInfo:
    id: str  # the config digest
    repo_tags: list[str] = field(default_factory=list)
    repo_digests: list[str] = field(default_factory=list)
    size: int = 0
    uid: int | None = None
    username: str = ""
    config: dict[str, Any] = field(default_factory=dict)  # the image config's "config"
    chain_id: str = ""  # the snapshot of its top layer
    names: list[str] = field(default_factory=list)  # every image record naming it


@dataclass(frozen=True)
class _Resolved:
    config_digest: str
    size: int
    config: dict[str, Any]
    chain_id: str


class CRIImages:
    def __init__(self, images: ImageStore, content: Any, unpacker: Unpacker, transfer: Any,
                 events: Any, gc: Any, snapshotter: str, snapshot_root: Path) -> None:
        self.images = images
        self.content = content
        self.unpacker = unpacker
        self.transfer = transfer
        self.events = events
        self.gc = gc
        self.snapshotter = snapshotter
        self.snapshot_root = snapshot_root
        self._usage: tuple[float, tuple[str, int, int]] | None = None
        self._usage_lock = asyncio.Lock()
        # Keyed by manifest/index digest: what it resolves to never changes.
        self._resolved: dict[str, _Resolved] = {}

    async def _resolve(self, target: Descriptor) -> _Resolved:
        cached = self._resolved.get(target.digest)
        if cached is not None:
            return cached
        config_digest, layers = await self.unpacker.layers(NAMESPACE, target)
        config = await read_json(self.content, NAMESPACE, config_digest,
                                 f"{config_digest}: config")
        chain = chain_ids([layer.diff_id for layer in layers])
        config_size = (await self.content.info(NAMESPACE, config_digest)).size
        resolved = _Resolved(
            config_digest=config_digest,
            size=target.size + config_size + sum(layer.blob.size for layer in layers),
            config=config, chain_id=chain[-1] if chain else "")
        self._resolved[target.digest] = resolved
        return resolved

    async def list(self) -> list[ImageInfo]:
        by_id: dict[str, ImageInfo] = {}
        for image in await self.images.list(NAMESPACE):
            try:
                resolved = await self._resolve(image.target)
            except CtrdError as exc:
                # An image without content for this platform is not runnable here.
                log.debug("image skipped", image=image.name, error=str(exc))
                continue
            info = by_id.get(resolved.config_digest)
            if info is None:
                info = by_id[resolved.config_digest] = _info(resolved)
            info.names.append(image.name)
            if image.name == resolved.config_digest:
                continue
            if "@" in image.name:
                info.repo_digests.append(image.name)
            else:
                info.repo_tags.append(image.name)
        return sorted(by_id.values(), key=lambda i: i.id)

    async def get(self, ref_or_id: str) -> ImageInfo:
        """The image a reference or digest reference names, else the one whose ID (with or
        without ``sha256:``) starts with ``ref_or_id``, as containerd resolves them."""
        if not ref_or_id:
            raise InvalidArgument("image reference is required")
        images = await self.list()
        try:
            name = str(reference.parse_normalized(ref_or_id))
        except CtrdError:
            name = ""  # not a reference: it may still be an ID
        for info in images:
            if name in info.names:
                return info
        prefix = ref_or_id if ref_or_id.startswith("sha256:") else f"sha256:{ref_or_id}"
        if _HEX_PREFIX.match(prefix):
            found = [info for info in images if info.id.startswith(prefix)]
            if len(found) == 1:
                return found[0]
        raise NotFound(f"image {ref_or_id!r} not found")

    async def pull(self, ref_text: str, credentials: Credentials | None = None) -> str:
        """Pull and unpack ``ref_text`` for this host; the image ID."""
        try:
            ref = reference.parse_normalized(ref_text)
        except CtrdError:
            raise InvalidArgument(f"invalid image reference {ref_text!r}") from None

        async def creds(host: str) -> Credentials | None:
            return credentials

        resolver = self.transfer.resolver(credentials=creds if credentials else None)
        host = platforms.host()
        options = PullOptions(platforms=platforms.Matcher.of([host]),
                              unpack=[UnpackTarget(host, self.snapshotter)],
                              image_name=str(ref), labels={MANAGED_LABEL: "managed"})
        pulled = await self.transfer.pull(NAMESPACE, ref, options, resolver=resolver)
        target = pulled[0].target
        resolved = await self._resolve(target)
        for name in (f"{ref.name}@{target.digest}", resolved.config_digest):
            await self._ensure_name(name, target)
        log.info("cri image pulled", ref=str(ref), image_id=resolved.config_digest)
        return resolved.config_digest

    async def _ensure_name(self, name: str, target: Descriptor) -> None:
        record = Image(name=name, target=target, labels={MANAGED_LABEL: "managed"})
        try:
            await self.images.get(NAMESPACE, name)
            await self.images.update(NAMESPACE, record)
        except NotFound:
            await self.images.create(NAMESPACE, record)

    async def remove(self, ref_or_id: str) -> None:
        """Remove every name of the image; an image already gone is not an error."""
        try:
            info = await self.get(ref_or_id)
        except NotFound:
            return
        for name in info.names:
            try:
                await self.images.delete(NAMESPACE, name)
            except NotFound:
                continue
            await self.events.publish(NAMESPACE, "/images/delete", ev.ImageDelete(name=name))
        self.gc.mark_dirty()
        log.info("cri image removed", image_id=info.id, names=info.names)

    async def fs_usage(self) -> tuple[str, int, int]:
        """Mount point of the snapshotter's folder, bytes and inodes used under it.

        Walking every snapshot is costly and kubelet asks every few seconds, so a walk
        serves for USAGE_TTL seconds (containerd too refreshes its figure on a timer);
        concurrent askers share one walk."""
        now = time.monotonic()
        if self._usage is None or now - self._usage[0] > USAGE_TTL:
            async with self._usage_lock:
                if self._usage is None or time.monotonic() - self._usage[0] > USAGE_TTL:
                    usage = await asyncio.to_thread(_usage, self.snapshot_root)
                    self._usage = (time.monotonic(), usage)
        assert self._usage is not None
        return self._usage[1]


def _info(resolved: _Resolved) -> ImageInfo:
    config = resolved.config.get("config") or {}
    info = ImageInfo(id=resolved.config_digest, size=resolved.size, config=config,
                     chain_id=resolved.chain_id)
    user = str(config.get("User") or "").split(":", 1)[0]
    if user.isdigit():
        info.uid = int(user)
    elif user:
        info.username = user
    return info


def _usage(root: Path) -> tuple[str, int, int]:
    used = inodes = 0
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            try:
                st = os.lstat(os.path.join(folder, name))
            except OSError:
                continue
            used += st.st_blocks * 512
            inodes += 1
    return str(root), used, inodes
