"""The "walking" differ: applies layers into snapshot mounts and makes layers from them.

Apply picks the cheapest correct target for the mounts it is given: the upper
directory of an overlay (whiteouts become overlay markers, missing parents copy their
attributes from the lower layers), the source of a writable bind mount (whiteouts
become deletions), or else a temporary mount of the whole thing.

Diff reads the two mounts as lists of layer directories. When the new side is the old
side plus one layer on top, that layer directory is the diff and is walked alone;
otherwise both sides are compared entry by entry (mounting them when they are unions).
"""
from __future__ import annotations

import asyncio
import os
import secrets
import tempfile
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import structlog

from ctrd.errors import CtrdError, InvalidArgument, Unimplemented
from ctrd.oci import mediatypes
from ctrd.oci.descriptor import Descriptor

from ..plugin import SERVICE, InitContext
from ..snapshots.mounts import Mount, layers, temp_mount
from . import compression
from .apply import Extractor
from .changes import TarWriter, compared_changes, layer_changes

log = structlog.get_logger()

UNCOMPRESSED_LABEL = "containerd.io/uncompressed"
_CHUNK = 1 << 20


@dataclass(frozen=True)
class _Target:
    root: str
    overlay: bool
    parents: tuple[str, ...] = ()


def _direct_target(mounts: Sequence[Mount]) -> _Target | None:
    """Where to extract without mounting anything, if the mounts allow it."""
    if len(mounts) != 1:
        return None
    m = mounts[0]
    if m.type == "overlay":
        upper = m.option("upperdir")
        lower = m.option("lowerdir")
        if upper:
            return _Target(upper, True, tuple(lower.split(":")) if lower else ())
        return None
    if (m.type == "bind" or "bind" in m.options or "rbind" in m.options) and not m.readonly:
        return _Target(m.source, False)
    return None


def _nonempty(dirs: list[str]) -> list[str]:
    """Layer lists without empty directories, which add nothing to a union."""
    kept = []
    for d in dirs:
        with os.scandir(d) as it:
            if next(it, None) is not None:
                kept.append(d)
    return kept


class WalkingDiffer:
    def __init__(self, content, tmp_root: Path) -> None:
        self.content = content
        self.tmp_root = tmp_root
        tmp_root.mkdir(parents=True, exist_ok=True, mode=0o700)

    # -- Apply --------------------------------------------------------------------

    async def apply(self, ns: str, desc: Descriptor, mounts: Sequence[Mount]) -> Descriptor:
        compressed = compression.is_compressed(desc.media_type)
        blob = await self.content.path(ns, desc.digest)
        digest, size = await asyncio.to_thread(self._apply, str(blob), compressed, mounts)
        log.debug("layer applied", namespace=ns, layer=desc.digest, diff_id=digest)
        return Descriptor(mediatypes.OCI_LAYER, digest, size)

    def _apply(self, blob: str, compressed: bool, mounts: Sequence[Mount]) -> tuple[str, int]:
        with ExitStack() as stack:
            target = _direct_target(mounts)
            if target is None:
                root = stack.enter_context(temp_mount(mounts, str(self.tmp_root)))
                target = _Target(root, False)
            pipe = compression.DecompressingPipe(blob, compressed)
            stack.callback(pipe.close)
            try:
                Extractor(target.root, overlay=target.overlay,
                          parents=target.parents).apply(pipe.reader)
            except (CtrdError, OSError):
                # A damaged stream shows up to the tar reader as a bad tar; report the cause.
                pipe.reader.close()
                cause = pipe.error()
                if cause is not None:
                    raise cause from None
                raise
            return pipe.finish(), pipe.size

    # -- Diff -----------------------------------------------------------------------

    async def compare(self, ns: str, lower: Sequence[Mount], upper: Sequence[Mount], *,
                      media_type: str = "", ref: str = "", labels: Mapping[str, str] | None = None,
                      lease: str | None = None) -> Descriptor:
        media_type = media_type or mediatypes.OCI_LAYER_GZIP
        kind = mediatypes.layer_compression(media_type)
        if kind is None:
            raise Unimplemented(f"unsupported diff media type: {media_type}: not implemented")
        if not upper:
            raise InvalidArgument("the upper mounts of a diff must not be empty")
        fd, tmp = tempfile.mkstemp(prefix="diff-", dir=self.tmp_root)
        os.close(fd)
        try:
            digest, diff_id = await asyncio.to_thread(
                self._compare, lower, upper, compression.Compression(kind), tmp)
            all_labels = {**(labels or {}), UNCOMPRESSED_LABEL: diff_id}
            info = await self.content.write_blob(
                ns, _chunks(tmp), expected=digest, labels=all_labels, lease=lease,
                ref=ref or f"diff-{secrets.token_hex(8)}")
        finally:
            os.unlink(tmp)
        log.debug("diff written", namespace=ns, digest=digest, diff_id=diff_id)
        return Descriptor(media_type, digest, info.size)

    def _compare(self, lower: Sequence[Mount], upper: Sequence[Mount],
                 kind: compression.Compression, out_path: str) -> tuple[str, str]:
        with open(out_path, "wb", buffering=_CHUNK) as out, ExitStack() as stack:
            sink = compression.CompressingWriter(out, kind)
            new = layers(upper)
            old = layers(lower) if lower else []
            if new is not None and old is not None:
                new, old = _nonempty(new), _nonempty(old)
            if new and old is not None and new[1:] == old:
                overlay = upper[0].type == "overlay"
                source = new[0]
                changes = layer_changes(source, overlay_markers=overlay)
            else:
                lower_root = self._readable_root(lower, stack)
                source = self._readable_root(upper, stack)
                changes = compared_changes(lower_root, source)
            writer = TarWriter(sink, source)
            writer.write_all(changes)
            writer.close()
            sink.close()
        return ("sha256:" + sink.compressed.hexdigest(),
                "sha256:" + sink.uncompressed.hexdigest())

    def _readable_root(self, mounts: Sequence[Mount], stack: ExitStack) -> str:
        if not mounts:
            return stack.enter_context(tempfile.TemporaryDirectory(dir=self.tmp_root))
        dirs = layers(mounts)
        if dirs is not None and len(dirs) == 1:
            return dirs[0]
        return stack.enter_context(temp_mount(mounts, str(self.tmp_root), readonly=True))


async def _chunks(path: str) -> AsyncIterator[bytes]:
    with open(path, "rb", buffering=0) as f:
        while chunk := await asyncio.to_thread(f.read, _CHUNK):
            yield chunk


def init(ctx: InitContext) -> WalkingDiffer:
    return WalkingDiffer(ctx.get(SERVICE, "content-service"), ctx.root / "tmpmounts")
