"""The overlayfs snapshotter: each snapshot is one layer directory, unioned at mount time.

Layout as containerd's: ``snapshots/<id>/fs`` (the layer) and ``snapshots/<id>/work``
(overlay's work dir, active snapshots only). Mount options, and their order, match
containerd 1.6 so that clients and shims see the same records from either daemon.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from ctrd.errors import FailedPrecondition

from ..plugin import InitContext
from .backend import Backend
from .mounts import Mount, mount, unmount
from .storage import Kind, Snapshot


def check_support(root: Path) -> None:
    """Mount a two-layer overlay under ``root``; raise if this host cannot."""
    tmp = tempfile.mkdtemp(prefix="overlay-check-", dir=root)
    try:
        for d in ("lower1", "lower2", "upper", "work", "merged"):
            os.mkdir(os.path.join(tmp, d))
        opts = (f"lowerdir={tmp}/lower2:{tmp}/lower1", f"upperdir={tmp}/upper",
                f"workdir={tmp}/work")
        try:
            mount(Mount("overlay", "overlay", opts), f"{tmp}/merged")
        except OSError as exc:
            raise FailedPrecondition(f"overlayfs is not supported on {root}: {exc}") from None
        unmount(f"{tmp}/merged")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


class OverlaySnapshotter(Backend):
    def __init__(self, root: Path) -> None:
        super().__init__(root)
        # containerd turns the overlay index feature off whenever the kernel knows it.
        self.index_off = os.path.exists("/sys/module/overlay/parameters/index")

    def upper_path(self, sid: str) -> str:
        return os.path.join(self.snapshot_dir(sid), "fs")

    def work_path(self, sid: str) -> str:
        return os.path.join(self.snapshot_dir(sid), "work")

    def _usage_dir(self, sid: str) -> str:
        return self.upper_path(sid)

    def _populate(self, tmp: str, snap: Snapshot) -> None:
        os.mkdir(os.path.join(tmp, "fs"), 0o755)
        if snap.kind == Kind.ACTIVE:
            os.mkdir(os.path.join(tmp, "work"), 0o711)
        if snap.parent_ids:
            # The new layer's root takes the owner of the layer below, as in containerd.
            st = os.stat(self.upper_path(snap.parent_ids[0]))
            os.lchown(os.path.join(tmp, "fs"), st.st_uid, st.st_gid)

    def _mounts(self, snap: Snapshot) -> list[Mount]:
        if not snap.parent_ids:
            flag = "ro" if snap.kind == Kind.VIEW else "rw"
            return [Mount("bind", self.upper_path(snap.id), (flag, "rbind"))]
        options: list[str] = ["index=off"] if self.index_off else []
        if snap.kind == Kind.ACTIVE:
            options += [f"workdir={self.work_path(snap.id)}",
                        f"upperdir={self.upper_path(snap.id)}"]
        elif len(snap.parent_ids) == 1:
            return [Mount("bind", self.upper_path(snap.parent_ids[0]), ("ro", "rbind"))]
        options.append("lowerdir=" + ":".join(self.upper_path(p) for p in snap.parent_ids))
        return [Mount("overlay", "overlay", tuple(options))]


def init(ctx: InitContext) -> OverlaySnapshotter:
    ctx.root.mkdir(parents=True, exist_ok=True, mode=0o700)
    check_support(ctx.root)
    snapshotter = OverlaySnapshotter(ctx.root)
    ctx.exports["root"] = str(ctx.root)
    return snapshotter
