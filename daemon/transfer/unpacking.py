"""Layer-at-a-time unpacking for pulls and imports, on top of the daemon's :class:`Unpacker`.

The unpacker knows how to turn one layer into a committed snapshot named by its chain
ID; a pull needs to feed it layers one by one as they arrive. A session keeps the
chain position between calls and, at the end, labels the config so the snapshot
chain lives as long as the image. Which snapshotter (if any) an image goes to, and
the layer loop with its progress, are the same for a pull and an archive import.
"""
from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import structlog

from ctrd.errors import InvalidArgument
from ctrd.oci.descriptor import Descriptor, Platform

from ..diff.walking import UNCOMPRESSED_LABEL
from ..remotes.platforms import Matcher, normalize
from ..unpack import Layer, Unpacker, chain_ids
from .progress import Tracker, ref_key

log = structlog.get_logger()


class UnpackSession(Protocol):
    """Applies one image's layers, in order, into a snapshot chain."""

    async def apply(self, layer: Descriptor, diff_id: str) -> None: ...

    async def commit(self) -> None: ...

    async def abort(self) -> None: ...


# (namespace, snapshotter, manifest, config descriptor, config JSON, lease) -> session
UnpackStarter = Callable[[str, str, Descriptor, Descriptor, dict[str, Any], str],
                         Awaitable[UnpackSession]]


@dataclass(frozen=True)
class UnpackTarget:
    platform: Platform
    snapshotter: str = ""


def config_platform(cfg: dict[str, Any]) -> Platform:
    """The platform an image config declares (for manifests no index entry describes)."""
    return Platform(cfg.get("os", ""), cfg.get("architecture", ""), cfg.get("variant", ""))


def snapshotter_for(targets: Sequence[UnpackTarget], platform: Platform,
                    default: str) -> str | None:
    """The snapshotter of the first target matching ``platform``; None: do not unpack."""
    for target in targets:
        if Matcher.of([target.platform]).match(normalize(platform)):
            return target.snapshotter or default
    return None


async def unpack_layers(start: UnpackStarter, namespace: str, lease: str, tracker: Tracker,
                        manifest: Descriptor, config: Descriptor, cfg: dict[str, Any],
                        layers: Sequence[Descriptor], snapshotter: str,
                        before_layer: Callable[[Descriptor], Awaitable[object]] | None = None
                        ) -> None:
    """Apply ``layers`` in order into ``snapshotter``, reporting each one's progress.

    ``before_layer`` is awaited before each layer is applied: a pull waits there for the
    layer's download, so unpacking follows the downloads as they complete.
    """
    diff_ids = list((cfg.get("rootfs") or {}).get("diff_ids") or [])
    if len(diff_ids) != len(layers):
        raise InvalidArgument(f"manifest {manifest.digest}: {len(layers)} layers but "
                              f"{len(diff_ids)} diff_ids in its config")
    session = await start(namespace, snapshotter, manifest, config, cfg, lease)
    parents = (ref_key(manifest),)
    try:
        for layer, diff_id in zip(layers, diff_ids):
            if before_layer is not None:
                await before_layer(layer)
            name = ref_key(layer)
            tracker.emit("unpacking", name, parents=parents, total=layer.size)
            await session.apply(layer, diff_id)
            tracker.emit("unpacked", name, parents=parents, progress=layer.size,
                         total=layer.size)
        await session.commit()
    except BaseException:
        await session.abort()
        raise


@dataclass
class LayerSession:
    unpacker: Unpacker
    namespace: str
    snapshotter: str
    config: Descriptor
    lease: str
    diff_ids: list[str] = field(default_factory=list)

    async def apply(self, layer: Descriptor, diff_id: str) -> None:
        parent = chain_ids(self.diff_ids)[-1] if self.diff_ids else ""
        self.diff_ids.append(diff_id)
        chain_id = chain_ids(self.diff_ids)[-1]
        # The unpacker's per-layer step: prepare, apply, check the diff ID, commit.
        created = await self.unpacker.apply_layer(
            self.namespace, self.snapshotter, Layer(layer, diff_id), chain_id, parent, self.lease)
        if created:
            await self.unpacker.content.update(self.namespace, layer.digest,
                                               {UNCOMPRESSED_LABEL: diff_id},
                                               [f"labels.{UNCOMPRESSED_LABEL}"])

    async def commit(self) -> None:
        if not self.diff_ids:
            return
        label = f"containerd.io/gc.ref.snapshot.{self.snapshotter}"
        top = chain_ids(self.diff_ids)[-1]
        await self.unpacker.content.update(self.namespace, self.config.digest, {label: top},
                                           [f"labels.{label}"])
        log.info("image unpacked", namespace=self.namespace, snapshotter=self.snapshotter,
                 layers=len(self.diff_ids), chain_id=top)

    async def abort(self) -> None:
        # Committed snapshots stay, held by the pull's lease until it ends; the unpacker
        # already removed the active snapshot of a layer that failed.
        log.info("unpack aborted", namespace=self.namespace, layers_done=len(self.diff_ids))


def starter(unpacker: Unpacker) -> UnpackStarter:
    async def start(namespace: str, snapshotter: str, manifest: Descriptor, config: Descriptor,
                    config_json: dict[str, Any], lease: str) -> LayerSession:
        return LayerSession(unpacker, namespace, snapshotter, config, lease)

    return start
