"""Computing the changes between two trees, and writing them as a layer tar.

Two ways to find changes:

* ``layer_changes``: the tree *is* a layer (an overlay upper directory, or any tree
  over an empty base): everything in it is a change, a 0:0 character device is a
  deletion and ``trusted.overlay.opaque=y`` marks a directory that hides its lower
  contents. One walk, no comparison.
* ``compared_changes``: walk both trees side by side in name order, as containerd's
  double walk does, emitting additions, modifications and deletions.

``TarWriter`` turns changes into tar entries: parents of a change are written before
it (from the new tree), deletions become ``.wh.<name>`` entries, hard-linked files are
written once and linked after, xattrs travel as PAX ``SCHILY.xattr.*`` records and
times keep their nanoseconds.
"""
from __future__ import annotations

import enum
import os
import stat
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

from .apply import OPAQUE_MARKER, OPAQUE_XATTR, WHITEOUT_PREFIX

_COPY_CHUNK = 1 << 20


class ChangeKind(enum.Enum):
    ADD = "add"
    MODIFY = "modify"
    DELETE = "delete"
    OPAQUE = "opaque"  # the directory hides everything below it in lower layers


@dataclass(frozen=True, slots=True)
class Change:
    kind: ChangeKind
    rel: str  # path below the root, no leading slash
    st: os.stat_result | None = None


def _sorted_entries(path: str) -> list[tuple[str, os.stat_result]]:
    with os.scandir(path) as it:
        found = [(e.name, e.stat(follow_symlinks=False)) for e in it]
    found.sort(key=lambda item: item[0])
    return found


def _is_whiteout_device(st: os.stat_result) -> bool:
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


def _is_opaque(path: str) -> bool:
    try:
        return os.getxattr(path, OPAQUE_XATTR, follow_symlinks=False) == b"y"
    except OSError:
        return False


def layer_changes(root: str, *, overlay_markers: bool) -> Iterator[Change]:
    """Everything under ``root`` as additions (overlay markers read as such if asked)."""
    def walk(rel: str) -> Iterator[Change]:
        base = os.path.join(root, rel) if rel else root
        for name, st in _sorted_entries(base):
            child = f"{rel}/{name}" if rel else name
            if overlay_markers and _is_whiteout_device(st):
                yield Change(ChangeKind.DELETE, child)
                continue
            yield Change(ChangeKind.ADD, child, st)
            if stat.S_ISDIR(st.st_mode):
                if overlay_markers and _is_opaque(os.path.join(root, child)):
                    yield Change(ChangeKind.OPAQUE, child)
                yield from walk(child)

    return walk("")


def _capability(path: str) -> bytes | None:
    try:
        return os.getxattr(path, "security.capability", follow_symlinks=False)
    except OSError:
        return None


def _same_contents(a: str, b: str) -> bool:
    with open(a, "rb", buffering=0) as fa, open(b, "rb", buffering=0) as fb:
        while True:
            ca, cb = fa.read(_COPY_CHUNK), fb.read(_COPY_CHUNK)
            if ca != cb:
                return False
            if not ca:
                return True


def _same(lpath: str, lst: os.stat_result, upath: str, ust: os.stat_result) -> bool:
    """Whether an entry is unchanged, by the rules of containerd's double walk."""
    if (lst.st_mode, lst.st_uid, lst.st_gid) != (ust.st_mode, ust.st_uid, ust.st_gid):
        return False
    if stat.S_ISDIR(ust.st_mode):
        return lst.st_mtime_ns == ust.st_mtime_ns
    if stat.S_ISCHR(ust.st_mode) or stat.S_ISBLK(ust.st_mode):
        if lst.st_rdev != ust.st_rdev:
            return False
    if lst.st_size != ust.st_size or lst.st_mtime_ns != ust.st_mtime_ns:
        return False
    if _capability(lpath) != _capability(upath):
        return False
    if stat.S_ISLNK(ust.st_mode):
        return os.readlink(lpath) == os.readlink(upath)
    if stat.S_ISREG(ust.st_mode) and ust.st_mtime_ns % 1_000_000_000 == 0:
        # Whole-second times cannot tell a rewrite apart: compare the bytes.
        return _same_contents(lpath, upath)
    return True


def compared_changes(lower: str, upper: str) -> Iterator[Change]:
    def added_tree(rel: str) -> Iterator[Change]:
        for name, st in _sorted_entries(os.path.join(upper, rel)):
            child = f"{rel}/{name}"
            yield Change(ChangeKind.ADD, child, st)
            if stat.S_ISDIR(st.st_mode):
                yield from added_tree(child)

    def walk(rel: str) -> Iterator[Change]:
        ldir = os.path.join(lower, rel) if rel else lower
        udir = os.path.join(upper, rel) if rel else upper
        old = dict(_sorted_entries(ldir))
        new = dict(_sorted_entries(udir))
        for name in sorted(old.keys() | new.keys()):
            child = f"{rel}/{name}" if rel else name
            ust = new.get(name)
            lst = old.get(name)
            if ust is None:
                yield Change(ChangeKind.DELETE, child)
                continue
            if lst is None:
                yield Change(ChangeKind.ADD, child, ust)
                if stat.S_ISDIR(ust.st_mode):
                    yield from added_tree(child)
                continue
            both_dirs = stat.S_ISDIR(lst.st_mode) and stat.S_ISDIR(ust.st_mode)
            if not _same(f"{ldir}/{name}", lst, f"{udir}/{name}", ust):
                yield Change(ChangeKind.MODIFY, child, ust)
                if stat.S_ISDIR(ust.st_mode) and not both_dirs:
                    yield from added_tree(child)
                    continue
            if both_dirs:
                yield from walk(child)

    return walk("")


class TarWriter:
    """Writes changes read from the tree at ``source`` as a PAX tar to ``out``."""

    def __init__(self, out: BinaryIO, source: str) -> None:
        self.source = source
        self._tar = tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT,
                                 bufsize=_COPY_CHUNK)
        self._written_dirs: set[str] = set()
        self._links: dict[tuple[int, int], str] = {}

    def close(self) -> None:
        self._tar.close()

    def write_all(self, changes: Iterator[Change]) -> None:
        for change in changes:
            self.write(change)

    def write(self, change: Change) -> None:
        parent = change.rel.rpartition("/")[0]
        self._parents(parent)
        if change.kind is ChangeKind.DELETE:
            name = (f"{parent}/" if parent else "") + WHITEOUT_PREFIX + change.rel.rpartition("/")[2]
            self._marker(name, parent)
        elif change.kind is ChangeKind.OPAQUE:
            self._marker(f"{change.rel}/{OPAQUE_MARKER}", change.rel)
        else:
            assert change.st is not None
            self._entry(change.rel, change.st)

    def _parents(self, rel_dir: str) -> None:
        if not rel_dir or rel_dir in self._written_dirs:
            return
        self._parents(rel_dir.rpartition("/")[0])
        self._entry(rel_dir, os.lstat(os.path.join(self.source, rel_dir)))

    def _marker(self, name: str, dir_rel: str) -> None:
        info = tarfile.TarInfo(name)
        info.type = tarfile.REGTYPE
        info.mode = 0
        # A fixed, meaningful time keeps diffs reproducible: that of the directory.
        info.mtime = int(os.lstat(os.path.join(self.source, dir_rel)).st_mtime)
        self._tar.addfile(info)

    def _entry(self, rel: str, st: os.stat_result) -> None:
        path = os.path.join(self.source, rel)
        mode = st.st_mode
        info = tarfile.TarInfo(rel)
        info.mode = stat.S_IMODE(mode)
        info.uid, info.gid = st.st_uid, st.st_gid
        info.mtime = st.st_mtime_ns // 1_000_000_000
        if st.st_mtime_ns % 1_000_000_000:
            secs, frac = divmod(st.st_mtime_ns, 1_000_000_000)
            info.pax_headers["mtime"] = f"{secs}.{frac:09d}".rstrip("0")
        try:
            for name in os.listxattr(path, follow_symlinks=False):
                if name.startswith("trusted.overlay."):
                    continue
                value = os.getxattr(path, name, follow_symlinks=False)
                info.pax_headers["SCHILY.xattr." + name] = value.decode("utf-8",
                                                                       "surrogateescape")
        except OSError:
            pass
        data = None
        if stat.S_ISDIR(mode):
            info.type = tarfile.DIRTYPE
            self._written_dirs.add(rel)
        elif stat.S_ISREG(mode):
            key = (st.st_dev, st.st_ino)
            first = self._links.get(key) if st.st_nlink > 1 else None
            if first is not None:
                info.type, info.linkname = tarfile.LNKTYPE, first
            else:
                if st.st_nlink > 1:
                    self._links[key] = rel
                info.type, info.size = tarfile.REGTYPE, st.st_size
                data = open(path, "rb")
        elif stat.S_ISLNK(mode):
            info.type, info.linkname = tarfile.SYMTYPE, os.readlink(path)
        elif stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
            info.type = tarfile.CHRTYPE if stat.S_ISCHR(mode) else tarfile.BLKTYPE
            info.devmajor, info.devminor = os.major(st.st_rdev), os.minor(st.st_rdev)
        elif stat.S_ISFIFO(mode):
            info.type = tarfile.FIFOTYPE
        else:
            return  # sockets have no tar form; containerd skips them too
        try:
            self._tar.addfile(info, data)
        finally:
            if data is not None:
                data.close()
