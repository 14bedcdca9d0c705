"""Unpacking an image into committed snapshots, one per layer, as containerd's client does.

Each layer becomes a committed snapshot named by its chain ID (a digest over the
diff IDs of that layer and all below it), so images sharing base layers share
snapshots. The image's config blob is labelled with the top snapshot so the
garbage collector keeps the snapshots while the image exists.
"""
from __future__ import annotations

import hashlib
import secrets

from ctrd import errors

from .content import Content
from .images import ResolvedImage
from .snapshots import Diff, Snapshots

UNCOMPRESSED_LABEL = "containerd.io/uncompressed"


def chain_ids(diff_ids: list[str]) -> list[str]:
    """The chain ID of every prefix of ``diff_ids`` (OCI image spec's definition)."""
    out: list[str] = []
    for diff_id in diff_ids:
        if not out:
            out.append(diff_id)
        else:
            out.append("sha256:" + hashlib.sha256(f"{out[-1]} {diff_id}".encode()).hexdigest())
    return out


def gc_snapshot_label(snapshotter: str) -> str:
    return f"containerd.io/gc.ref.snapshot.{snapshotter}"


async def unpack(resolved: ResolvedImage, snapshots: Snapshots, diff: Diff,
                 content: Content) -> str:
    """Make sure every layer of ``resolved`` is a committed snapshot; returns the top
    chain ID (the parent for a container's writable snapshot)."""
    diff_ids = resolved.diff_ids
    if len(diff_ids) != len(resolved.layers):
        raise errors.FailedPrecondition(
            f"image {resolved.image.name}: {len(resolved.layers)} layers but "
            f"{len(diff_ids)} diff ids in its config")
    if not diff_ids:
        raise errors.FailedPrecondition(f"image {resolved.image.name} has no layers")
    chain = chain_ids(diff_ids)
    parent = ""
    for layer, diff_id, chain_id in zip(resolved.layers, diff_ids, chain):
        if not await _exists(snapshots, chain_id):
            key = f"extract-{secrets.token_hex(6)} {chain_id}"
            mounts = await snapshots.prepare(key, parent)
            try:
                applied = await diff.apply(layer, mounts)
                if applied.digest != diff_id:
                    raise errors.FailedPrecondition(
                        f"layer {layer.digest}: unpacked to {applied.digest}, "
                        f"config says {diff_id}")
                try:
                    await snapshots.commit(chain_id, key)
                except errors.AlreadyExists:
                    pass  # unpacked concurrently by someone else: theirs is as good
            except BaseException:
                await _remove_quietly(snapshots, key)
                raise
            await content.set_labels(layer.digest, {UNCOMPRESSED_LABEL: diff_id})
        parent = chain_id
    await content.set_labels(resolved.config_descriptor.digest,
                             {gc_snapshot_label(snapshots.snapshotter): chain[-1]})
    return chain[-1]


async def _exists(snapshots: Snapshots, key: str) -> bool:
    try:
        await snapshots.stat(key)
    except errors.NotFound:
        return False
    return True


async def _remove_quietly(snapshots: Snapshots, key: str) -> None:
    try:
        await snapshots.remove(key)
    except errors.CtrdError:
        pass
