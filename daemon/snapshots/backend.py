"""What overlayfs and native snapshotters share: records, directory life cycle, usage.

A new snapshot is built in a ``new-*`` temporary directory and renamed to its id
inside the metadata transaction, so a crash leaves either a complete snapshot or an
unreferenced directory that ``cleanup`` removes. Methods are blocking: the namespaced
layer calls them from worker threads.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Mapping
from pathlib import Path

import structlog

from ctrd.errors import FailedPrecondition

from . import storage
from .mounts import Mount
from .storage import Info, Kind, Snapshot, Usage

log = structlog.get_logger()

# Labels with this prefix are passed down from the namespaced layer to backends.
INHERITED_LABEL_PREFIX = "containerd.io/snapshot/"


def disk_usage(root: str) -> Usage:
    """Allocated bytes and distinct inodes below ``root`` (hard links counted once)."""
    seen: set[tuple[int, int]] = set()
    size = 0
    st = os.lstat(root)
    seen.add((st.st_dev, st.st_ino))
    size += st.st_blocks * 512
    stack = [root]
    while stack:
        with os.scandir(stack.pop()) as it:
            for entry in it:
                st = entry.stat(follow_symlinks=False)
                key = (st.st_dev, st.st_ino)
                if key not in seen:
                    seen.add(key)
                    size += st.st_blocks * 512
                if entry.is_dir(follow_symlinks=False):
                    stack.append(entry.path)
    return Usage(size, len(seen))


class Backend(ABC):
    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True, mode=0o700)
        (root / "snapshots").mkdir(exist_ok=True, mode=0o700)
        self.ms = storage.MetaStore(root / "metadata.db")

    # -- layout, per backend ------------------------------------------------

    def snapshot_dir(self, sid: str) -> str:
        return str(self.root / "snapshots" / sid)

    @abstractmethod
    def _populate(self, tmp: str, snap: Snapshot) -> None:
        """Fill the temporary directory of a new snapshot."""

    @abstractmethod
    def _mounts(self, snap: Snapshot) -> list[Mount]:
        """The mounts of a snapshot, exactly as containerd's backend gives them."""

    @abstractmethod
    def _usage_dir(self, sid: str) -> str:
        """The directory whose contents a snapshot's usage counts."""

    # -- the Snapshotter interface -------------------------------------------

    def stat(self, key: str) -> Info:
        with self.ms.transaction() as conn:
            return storage.get_info(conn, key)[1]

    def update_labels(self, key: str, labels: Mapping[str, str]) -> Info:
        with self.ms.transaction() as conn:
            return storage.update_labels(conn, key, labels)

    def usage(self, key: str) -> Usage:
        with self.ms.transaction() as conn:
            sid, info, usage = storage.get_info(conn, key)
        if info.kind == Kind.ACTIVE:
            return disk_usage(self._usage_dir(sid))
        return usage

    def mounts(self, key: str) -> list[Mount]:
        with self.ms.transaction() as conn:
            try:
                return self._mounts(storage.get_snapshot(conn, key))
            except FailedPrecondition as exc:
                raise FailedPrecondition(f"failed to get active mount: {exc}") from None

    def prepare(self, key: str, parent: str, labels: Mapping[str, str]) -> list[Mount]:
        return self._create(Kind.ACTIVE, key, parent, labels)

    def view(self, key: str, parent: str, labels: Mapping[str, str]) -> list[Mount]:
        return self._create(Kind.VIEW, key, parent, labels)

    def _create(self, kind: Kind, key: str, parent: str,
                labels: Mapping[str, str]) -> list[Mount]:
        inherited = {k: v for k, v in labels.items() if k.startswith(INHERITED_LABEL_PREFIX)}
        tmp = tempfile.mkdtemp(prefix="new-", dir=self.root / "snapshots")
        final = ""
        try:
            with self.ms.transaction() as conn:
                snap = storage.create(conn, kind, key, parent, inherited)
                self._populate(tmp, snap)
                final = self.snapshot_dir(snap.id)
                os.rename(tmp, final)
                return self._mounts(snap)
        except BaseException:
            # Either still the temporary directory, or renamed but with the record rolled
            # back: in both cases nothing refers to it.
            shutil.rmtree(final if final and not os.path.exists(tmp) else tmp,
                          ignore_errors=True)
            raise

    def commit(self, name: str, key: str, labels: Mapping[str, str]) -> None:
        with self.ms.transaction() as conn:
            sid, _, _ = storage.get_info(conn, key)
            usage = disk_usage(self._usage_dir(sid))
            storage.commit_active(conn, key, name, usage, labels)

    def remove(self, key: str) -> None:
        with self.ms.transaction() as conn:
            sid, _ = storage.remove(conn, key)
        shutil.rmtree(self.snapshot_dir(sid), ignore_errors=True)

    def walk(self) -> list[Info]:
        with self.ms.transaction() as conn:
            return storage.walk(conn)

    def cleanup(self) -> list[str]:
        """Remove directories no record owns (crashed creations, failed removals)."""
        with self.ms.transaction() as conn:
            ids = storage.id_map(conn)
            gone = [d for d in os.listdir(self.root / "snapshots") if d not in ids]
            for d in gone:
                shutil.rmtree(self.root / "snapshots" / d, ignore_errors=True)
        if gone:
            log.info("snapshot directories cleaned up", root=str(self.root), count=len(gone))
        return gone

    def close(self) -> None:
        self.ms.close()
