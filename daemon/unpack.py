"""Daemon-side unpack: an image's layers turned into a chain of committed snapshots.

Snapshots are named by chain ID, so layers shared between images are unpacked once
and an unpack that finds a chain ID already there skips that layer. Each layer is
applied into an ``extract-<random> <chainID>`` active snapshot, its computed diff ID is
checked against the config's, and only then is it committed; on any failure the
active snapshot is removed, so nothing half-extracted survives. Labels are set as
containerd's unpacker sets them: ``containerd.io/uncompressed`` on each layer blob
and ``containerd.io/gc.ref.snapshot.<snapshotter>`` on the config blob, which keeps
the snapshot chain alive for as long as the image holds the config.
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import platform as host
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import structlog

from ctrd.errors import AlreadyExists, DataLoss, InvalidArgument, NotFound
from ctrd.oci import mediatypes
from ctrd.oci.descriptor import Descriptor

from .diff.walking import UNCOMPRESSED_LABEL, WalkingDiffer
from .metadata.snapshots import SNAPSHOT_REF_LABEL, SnapshotStore

log = structlog.get_logger()

_ARCH = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm", "i686": "386"}


def chain_ids(diff_ids: Sequence[str]) -> list[str]:
    """The identity of each layer stack: its own diff ID over its parent's chain ID."""
    chain: list[str] = []
    for diff_id in diff_ids:
        if not chain:
            chain.append(diff_id)
        else:
            text = f"{chain[-1]} {diff_id}".encode()
            chain.append("sha256:" + hashlib.sha256(text).hexdigest())
    return chain


def _host_platform() -> tuple[str, str]:
    machine = host.machine().lower()
    return "linux", _ARCH.get(machine, machine)


@dataclass(frozen=True)
class Layer:
    blob: Descriptor
    diff_id: str


class Unpacker:
    def __init__(self, content: Any, snapshots: SnapshotStore, differ: WalkingDiffer) -> None:
        self.content = content
        self.snapshots = snapshots
        self.differ = differ

    async def _json(self, ns: str, digest: str) -> dict[str, Any]:
        path = await self.content.path(ns, digest)
        data = await asyncio.to_thread(path.read_bytes)
        try:
            return json.loads(data)
        except ValueError as exc:
            raise InvalidArgument(f"blob {digest} is not valid JSON: {exc}") from None

    async def _manifest(self, ns: str, target: Descriptor) -> dict[str, Any]:
        if mediatypes.is_manifest(target.media_type):
            return await self._json(ns, target.digest)
        if not mediatypes.is_index(target.media_type):
            raise InvalidArgument(f"cannot unpack media type {target.media_type}")
        index = await self._json(ns, target.digest)
        want_os, want_arch = _host_platform()
        for m in index.get("manifests", []):
            plat = m.get("platform") or {}
            if plat.get("os", want_os) == want_os and \
                    plat.get("architecture", want_arch) == want_arch:
                return await self._manifest(ns, Descriptor(m["mediaType"], m["digest"],
                                                           m.get("size", 0)))
        raise NotFound(f"no manifest for platform {want_os}/{want_arch} in {target.digest}")

    async def layers(self, ns: str, target: Descriptor) -> tuple[str, list[Layer]]:
        """The config digest and the layers (blob, diff ID) of the image at ``target``."""
        manifest = await self._manifest(ns, target)
        config_digest = manifest["config"]["digest"]
        config = await self._json(ns, config_digest)
        diff_ids = (config.get("rootfs") or {}).get("diff_ids") or []
        blobs = [Descriptor(d["mediaType"], d["digest"], d.get("size", 0),
                            d.get("annotations") or {})
                 for d in manifest.get("layers", []) if mediatypes.is_layer(d["mediaType"])]
        if len(blobs) != len(diff_ids):
            raise InvalidArgument(f"mismatched image rootfs and manifest layers: "
                                  f"{len(diff_ids)} diff IDs for {len(blobs)} layers")
        return config_digest, [Layer(b, d) for b, d in zip(blobs, diff_ids)]

    async def unpack(self, ns: str, target: Descriptor, snapshotter: str = "overlayfs",
                     lease: str | None = None) -> str:
        """Unpack the image at ``target``; returns the chain ID of its top snapshot."""
        config_digest, layers = await self.layers(ns, target)
        chain = chain_ids([layer.diff_id for layer in layers])
        parent = ""
        for layer, chain_id in zip(layers, chain):
            if await self.apply_layer(ns, snapshotter, layer, chain_id, parent, lease):
                await self.content.update(ns, layer.blob.digest,
                                          {UNCOMPRESSED_LABEL: layer.diff_id},
                                          [f"labels.{UNCOMPRESSED_LABEL}"])
            parent = chain_id
        if chain:
            gc_label = f"containerd.io/gc.ref.snapshot.{snapshotter}"
            await self.content.update(ns, config_digest, {gc_label: chain[-1]},
                                      [f"labels.{gc_label}"])
        log.info("image unpacked", namespace=ns, image=target.digest, snapshotter=snapshotter,
                 layers=len(layers), chain_id=chain[-1] if chain else "")
        return chain[-1] if chain else ""

    async def apply_layer(self, ns: str, sn: str, layer: Layer, chain_id: str, parent: str,
                           lease: str | None) -> bool:
        """Make snapshot ``chain_id``; False if it was already there."""
        try:
            await self.snapshots.stat(ns, sn, chain_id)
            return False
        except NotFound:
            pass
        labels: Mapping[str, str] = {SNAPSHOT_REF_LABEL: chain_id}
        key = f"extract-{secrets.token_hex(8)} {chain_id}"
        try:
            mounts = await self.snapshots.prepare(ns, sn, key, parent, labels, lease)
        except AlreadyExists:
            return False  # a concurrent unpack is making (or made) the same snapshot
        try:
            applied = await self.differ.apply(ns, layer.blob, mounts)
            if applied.digest != layer.diff_id:
                raise DataLoss(f"wrong diff id calculated on extraction {layer.diff_id!r}: "
                               f"layer {layer.blob.digest} unpacks to {applied.digest}")
            try:
                await self.snapshots.commit(ns, sn, chain_id, key, labels, lease)
            except AlreadyExists:
                await self.snapshots.remove(ns, sn, key)
                return False
        except BaseException:
            try:
                await self.snapshots.remove(ns, sn, key)
            except NotFound:
                pass
            raise
        return True

