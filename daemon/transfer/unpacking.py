"""Layer-at-a-time unpacking for pulls, on top of the daemon's :class:`Unpacker`.

The unpacker knows how to turn one layer into a committed snapshot named by its chain
ID; a pull needs to feed it layers one by one as they arrive. A session keeps the
chain position between calls and, at the end, labels the config so the snapshot
chain lives as long as the image.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import structlog

from ctrd.oci.descriptor import Descriptor

from ..diff.walking import UNCOMPRESSED_LABEL
from ..unpack import Layer, Unpacker, chain_ids
from .pull import UnpackStarter

log = structlog.get_logger()


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
