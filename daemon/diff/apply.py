"""Extracting a layer tar into a directory, safely and fast.

Safety follows containerd's archive package: names are cleaned and every parent path
is resolved *inside* the target, as if the target were ``/`` (so ``..``, absolute
names and symlinked parents cannot lead out); the last component is never followed
(whatever is there is replaced); hard link targets are resolved the same way; a
whiteout may only name an entry of its own directory.

Whiteouts are either turned into overlay's own markers (a 0:0 character device, the
``trusted.overlay.opaque`` xattr), when extracting into an overlay upper directory, or
carried out as deletions, when extracting into a full tree.

Speed: parent resolution is cached until the tree changes shape (a symlink appears
or something is removed); regular files are written through one descriptor that also
takes owner, xattrs, mode and times; sparse files keep their holes.
"""
from __future__ import annotations

import errno
import os
import shutil
import stat
import tarfile
from collections import deque
from collections.abc import Sequence
from typing import BinaryIO

from ctrd.errors import CtrdError, InvalidArgument

WHITEOUT_PREFIX = ".wh."
OPAQUE_MARKER = ".wh..wh..opq"
OPAQUE_XATTR = "trusted.overlay.opaque"
_XATTR_PAX = "SCHILY.xattr."
_MAX_LINKS = 255
_CHUNK = 1 << 20
_FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC
_DEVICES = {tarfile.CHRTYPE: stat.S_IFCHR, tarfile.BLKTYPE: stat.S_IFBLK,
            tarfile.FIFOTYPE: stat.S_IFIFO}


class LayerError(InvalidArgument):
    """The layer itself is unacceptable (as opposed to a failure of the host)."""


def scoped_path(root: str, rel: str) -> str:
    """``rel`` resolved under ``root`` as if ``root`` were the filesystem root.

    Symlinks met on the way are followed, absolute ones restarting at ``root``; ``..``
    stops at ``root``; components that do not exist are taken literally.
    """
    parts = deque(p for p in rel.split("/") if p and p != ".")
    resolved: list[str] = []
    links = 0
    while parts:
        part = parts.popleft()
        if part == "..":
            if resolved:
                resolved.pop()
            continue
        candidate = root + "/" + "/".join(resolved + [part]) if resolved else root + "/" + part
        try:
            st = os.lstat(candidate)
        except (FileNotFoundError, NotADirectoryError):
            resolved.append(part)
            continue
        if not stat.S_ISLNK(st.st_mode):
            resolved.append(part)
            continue
        links += 1
        if links > _MAX_LINKS:
            raise LayerError(f"too many symlinks resolving {rel!r} under the layer root")
        target = os.readlink(candidate)
        if target.startswith("/"):
            resolved = []
        parts.extendleft(reversed([p for p in target.split("/") if p and p != "."]))
    return root + "/" + "/".join(resolved) if resolved else root


def _times(info: tarfile.TarInfo) -> tuple[int, int]:
    """(atime, mtime) in nanoseconds; PAX times are parsed exactly, not through a float."""
    def exact(text: str | None, fallback: float) -> int:
        if text:
            whole, _, frac = text.partition(".")
            try:
                sign = -1 if whole.startswith("-") else 1
                return int(whole) * 1_000_000_000 + sign * int((frac + "000000000")[:9])
            except ValueError:
                pass
        return int(fallback * 1_000_000_000)

    mtime = exact(info.pax_headers.get("mtime"), info.mtime)
    atime = exact(info.pax_headers.get("atime"), info.mtime)
    return max(atime, mtime), mtime


def _xattrs(info: tarfile.TarInfo) -> list[tuple[str, bytes]]:
    return [(k[len(_XATTR_PAX):], v.encode("utf-8", "surrogateescape"))
            for k, v in info.pax_headers.items() if k.startswith(_XATTR_PAX)]


def _set_xattr(target: str | int, name: str, value: bytes) -> None:
    try:
        if isinstance(target, int):
            os.setxattr(target, name, value)
        else:
            os.setxattr(target, name, value, follow_symlinks=False)
    except OSError as exc:
        # Filesystems without xattrs, and user.* on special files, cannot take them;
        # containerd skips those too.
        if exc.errno == errno.ENOTSUP or (exc.errno == errno.EPERM and name.startswith("user.")):
            return
        raise


def _remove(path: str) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(path)
    else:
        os.unlink(path)


class Extractor:
    def __init__(self, root: str, *, overlay: bool, parents: Sequence[str] = ()) -> None:
        self.root = os.path.realpath(root)
        self.overlay = overlay
        self.parents = list(parents)
        self._parent_cache: dict[str, str] = {}
        self._unpacked: set[str] = set()
        self._dirs: list[tuple[str, int, int]] = []

    # -- paths ----------------------------------------------------------------

    def _parent(self, rel_dir: str) -> str:
        found = self._parent_cache.get(rel_dir)
        if found is None:
            found = scoped_path(self.root, rel_dir) if rel_dir else self.root
            self._parent_cache[rel_dir] = found
        return found

    def _reshaped(self) -> None:
        self._parent_cache.clear()

    def _mkparent(self, path: str) -> None:
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            pass
        else:
            if stat.S_ISDIR(st.st_mode):
                return
            raise LayerError(f"{path[len(self.root):]}: parent is not a directory")
        up = os.path.dirname(path)
        if len(up) > len(self.root):
            self._mkparent(up)
        os.mkdir(path, 0o755)
        rel = path[len(self.root) + 1:]
        for lower in self.parents:
            lpath = scoped_path(lower, rel)
            try:
                st = os.lstat(lpath)
            except FileNotFoundError:
                continue
            if stat.S_ISDIR(st.st_mode):
                # The layer below has this directory: keep its owner, mode and xattrs,
                # or the union would show the directory changed.
                os.chown(path, st.st_uid, st.st_gid)
                os.chmod(path, stat.S_IMODE(st.st_mode))
                for name in os.listxattr(lpath, follow_symlinks=False):
                    if not name.startswith("trusted.overlay."):
                        _set_xattr(path, name, os.getxattr(lpath, name, follow_symlinks=False))
                os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
            break

    # -- whiteouts --------------------------------------------------------------

    def _whiteout(self, info: tarfile.TarInfo, parent: str, base: str) -> None:
        if base == OPAQUE_MARKER:
            if self.overlay:
                os.setxattr(parent, OPAQUE_XATTR, b"y")
            else:
                self._clear_opaque(parent)
            return
        hidden = base[len(WHITEOUT_PREFIX):]
        if hidden in ("", ".", "..") or "/" in hidden:
            raise LayerError(f"invalid whiteout name: {base}")
        target = parent + "/" + hidden
        self._reshaped()
        if self.overlay:
            _remove(target)
            os.mknod(target, stat.S_IFCHR, 0)
            os.chown(target, info.uid, info.gid, follow_symlinks=False)
        else:
            _remove(target)

    def _clear_opaque(self, directory: str) -> None:
        """Delete what lower layers put in ``directory``, keeping this layer's entries."""
        self._reshaped()
        with os.scandir(directory) as it:
            entries = list(it)
        for entry in entries:
            if entry.path not in self._unpacked:
                _remove(entry.path)
            elif entry.is_dir(follow_symlinks=False):
                self._clear_opaque(entry.path)

    # -- entries ----------------------------------------------------------------

    def apply(self, stream: BinaryIO) -> None:
        try:
            archive = tarfile.open(fileobj=stream, mode="r|", errorlevel=2)
        except tarfile.ReadError as exc:
            if "empty file" in str(exc):
                return  # a layer with no bytes at all: nothing to extract
            raise LayerError(f"not a tar stream: {exc}") from None
        with archive:
            try:
                for info in archive:
                    try:
                        self._entry(archive, info)
                    except CtrdError:
                        raise
                    except OSError as exc:
                        raise LayerError(f"extracting {info.name!r}: {exc}") from None
            except tarfile.TarError as exc:
                raise LayerError(f"invalid tar stream: {exc}") from None
        for path, atime, mtime in reversed(self._dirs):
            os.utime(path, ns=(atime, mtime), follow_symlinks=False)

    def _entry(self, archive: tarfile.TarFile, info: tarfile.TarInfo) -> None:
        clean = os.path.normpath("/" + info.name.lstrip("/"))
        if clean == "/":
            return  # the root itself: containerd leaves it alone
        rel_dir, _, base = clean[1:].rpartition("/")
        parent = self._parent(rel_dir)
        path = parent + "/" + base
        if path == self.root or not path.startswith(self.root + "/"):
            return
        if parent != self.root:
            self._mkparent(parent)

        if base.startswith(WHITEOUT_PREFIX):
            self._whiteout(info, parent, base)
            return

        try:
            st = os.lstat(path)
        except FileNotFoundError:
            pass
        else:
            if not (stat.S_ISDIR(st.st_mode) and info.isdir()):
                if stat.S_ISDIR(st.st_mode):
                    shutil.rmtree(path)
                    self._reshaped()
                else:
                    if stat.S_ISLNK(st.st_mode):
                        self._reshaped()
                    os.unlink(path)

        mode = info.mode & 0o7777
        atime, mtime = _times(info)
        if info.isreg():
            self._write_file(archive, info, path, mode, atime, mtime)
        else:
            self._write_other(info, path, mode, atime, mtime)
        if not self.overlay:
            self._unpacked.add(path)

    def _write_file(self, archive: tarfile.TarFile, info: tarfile.TarInfo, path: str,
                    mode: int, atime: int, mtime: int) -> None:
        fd = os.open(path, _FILE_FLAGS, 0o600)
        try:
            if info.sparse is not None:
                self._write_sparse(archive, info, fd)
            elif info.size:
                src = archive.extractfile(info)
                remaining = info.size
                while remaining:
                    chunk = src.read(min(remaining, _CHUNK))
                    if not chunk:
                        raise LayerError(f"{info.name!r}: unexpected end of layer data")
                    remaining -= len(chunk)
                    view = memoryview(chunk)
                    while view:
                        view = view[os.write(fd, view):]
            os.fchown(fd, info.uid, info.gid)
            for name, value in _xattrs(info):
                _set_xattr(fd, name, value)
            os.fchmod(fd, mode)
            os.utime(fd, ns=(atime, mtime))
        finally:
            os.close(fd)

    @staticmethod
    def _write_sparse(archive: tarfile.TarFile, info: tarfile.TarInfo, fd: int) -> None:
        """Write only the data regions of a sparse member; the holes stay holes."""
        src = archive.fileobj
        if src.tell() != info.offset_data:
            src.seek(info.offset_data)
        for offset, length in info.sparse:
            remaining, at = length, offset
            while remaining:
                chunk = src.read(min(remaining, _CHUNK))
                if not chunk:
                    raise LayerError(f"{info.name!r}: unexpected end of sparse data")
                os.pwrite(fd, chunk, at)
                at += len(chunk)
                remaining -= len(chunk)
        os.ftruncate(fd, info.size)

    def _write_other(self, info: tarfile.TarInfo, path: str, mode: int, atime: int,
                     mtime: int) -> None:
        if info.isdir():
            if not os.path.isdir(path) or os.path.islink(path):
                os.mkdir(path, 0o700)
        elif info.issym():
            os.symlink(info.linkname, path)
            self._reshaped()
        elif info.islnk():
            os.link(self._link_target(info.linkname), path, follow_symlinks=False)
        elif info.type in _DEVICES:
            os.mknod(path, _DEVICES[info.type] | 0o600, os.makedev(info.devmajor, info.devminor))
        else:
            raise LayerError(f"{info.name!r}: unhandled tar entry type {info.type!r}")
        os.chown(path, info.uid, info.gid, follow_symlinks=False)
        for name, value in _xattrs(info):
            _set_xattr(path, name, value)
        if not info.issym():
            os.chmod(path, mode)
            if info.isdir():
                self._dirs.append((path, atime, mtime))
                return
        os.utime(path, ns=(atime, mtime), follow_symlinks=False)

    def _link_target(self, linkname: str) -> str:
        rel_dir, _, base = linkname.rpartition("/")
        target = os.path.normpath(scoped_path(self.root, rel_dir) + "/" + base)
        if not target.startswith(self.root + "/"):
            raise LayerError(f"hard link target {linkname!r} is outside the layer")
        if not os.path.lexists(target):
            # Names with ".." were taken as relative to the layer root, as containerd does;
            # what they point at must then be an earlier entry of this layer.
            raise LayerError(f"hard link target {linkname!r} is not in the layer")
        return target
