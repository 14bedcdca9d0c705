"""Persistent network namespaces for pod sandboxes, as containerd's pkg/netns keeps them.

A namespace outlives every process in it when it is bind-mounted onto a file; the CRI
plugin makes one per sandbox (``<dir>/cni-<uuid>``), hands its path to the CNI plugins
and to runc, and unmounts it when the sandbox is removed.

The namespace is created by a short-lived thread of its own: ``unshare(CLONE_NEWNET)``
moves only the calling thread, so that thread is the one that switches and then exits,
and no thread that runs daemon code ever leaves the host's namespace.

Like ``ip netns``, the directory is made a mount point with shared propagation first,
so the namespace mounts below it also appear in mount namespaces cloned later (a
container that bind-mounts /var/run/netns sees namespaces made after it started).
"""
from __future__ import annotations

import asyncio
import ctypes
import errno
import fcntl
import os
import socket
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path

import structlog
from ctrd.shim.mount import MS_BIND, MS_REC, MS_SHARED

from ctrd.errors import CtrdError, Internal, InvalidArgument, NotFound, PermissionDenied

log = structlog.get_logger()

MNT_DETACH = 0x2
# ioctl on a namespace file: which kind of namespace it is (linux/nsfs.h).
NS_GET_NSTYPE = 0xB703
DEFAULT_DIR = Path("/var/run/netns")


@dataclass(frozen=True)
class NetNS:
    """A bind-mounted network namespace, known by the file it is mounted on."""

    path: Path

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> NetNS:
        """Refer to an existing namespace file (one made earlier, e.g. before a restart)."""
        return cls(Path(path))

    def is_mounted(self) -> bool:
        return is_mounted(self.path)

    async def closed(self) -> bool:
        """True when the namespace is gone; a leftover plain file is removed on the way."""
        return await asyncio.to_thread(_closed, self.path)

    async def remove(self) -> None:
        await remove(self.path)


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _error(action: str, path: Path, err: int) -> CtrdError:
    text = f"{action} {path}: {os.strerror(err)} (errno {errno.errorcode.get(err, err)})"
    if err in (errno.EPERM, errno.EACCES):
        return PermissionDenied(text)
    if err == errno.ENOENT:
        return NotFound(text)
    return Internal(text)


def _mount(source: str, target: Path, flags: int) -> None:
    if _libc().mount(source.encode(), os.fsencode(target), b"none", ctypes.c_ulong(flags),
                     None) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), str(target))


def is_mounted(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` currently is a network namespace (and not a plain file)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        return fcntl.ioctl(fd, NS_GET_NSTYPE) == os.CLONE_NEWNET
    except OSError:
        # ENOTTY: an ordinary file, the mount is gone.
        return False
    finally:
        os.close(fd)


def _make_shared_mountpoint(directory: Path) -> None:
    """Give ``directory`` shared propagation, binding it onto itself if it is no mount point."""
    # Several daemons (or ``ip netns``) may prepare the same directory at once; without
    # the lock two of them could each stack a self-bind mount.
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            _mount("", directory, MS_SHARED | MS_REC)
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
            _mount(str(directory), directory, MS_BIND | MS_REC)
            _mount("", directory, MS_SHARED | MS_REC)
    finally:
        os.close(fd)


def _bind_new_netns(target: Path) -> None:
    """Make a new network namespace in a throwaway thread and pin it on ``target``."""
    failure: list[OSError] = []

    def work() -> None:
        try:
            os.unshare(os.CLONE_NEWNET)
            _mount("/proc/thread-self/ns/net", target, MS_BIND)
        except OSError as exc:
            failure.append(exc)
        # Returning ends the OS thread, and the namespace it switched to leaves with it.

    thread = threading.Thread(target=work, name="netns-create", daemon=True)
    thread.start()
    thread.join()
    if failure:
        raise failure[0]


def _create(directory: Path) -> NetNS:
    path = directory / f"cni-{uuid.uuid4()}"
    try:
        directory.mkdir(mode=0o755, parents=True, exist_ok=True)
        _make_shared_mountpoint(directory)
    except OSError as exc:
        raise _error("prepare netns directory", directory, exc.errno or errno.EIO) from exc
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o444)
        os.close(fd)
    except OSError as exc:
        raise _error("create netns mount point", path, exc.errno or errno.EIO) from exc
    try:
        _bind_new_netns(path)
    except OSError as exc:
        path.unlink(missing_ok=True)
        raise _error("create network namespace at", path, exc.errno or errno.EIO) from exc
    log.debug("netns created", path=str(path))
    return NetNS(path)


async def create(directory: str | os.PathLike[str] = DEFAULT_DIR) -> NetNS:
    """A new network namespace pinned on ``<directory>/cni-<uuid4>``."""
    directory = Path(directory)
    if not directory.is_absolute():
        raise InvalidArgument(f"netns directory must be absolute: {directory}")
    return await asyncio.to_thread(_create, directory)


def _remove(path: Path) -> None:
    try:
        # Resolve first: unmounting through a symlink would leave the real mount behind.
        real = path.resolve(strict=True)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise _error("resolve netns", path, exc.errno or errno.EIO) from exc
    if _libc().umount2(os.fsencode(real), MNT_DETACH) != 0:
        err = ctypes.get_errno()
        # EINVAL: not (or no longer) a mount point; ENOENT: removed meanwhile.
        if err not in (errno.EINVAL, errno.ENOENT):
            raise _error("unmount netns", real, err)
    try:
        real.unlink(missing_ok=True)
    except OSError as exc:
        raise _error("remove netns file", real, exc.errno or errno.EIO) from exc
    log.debug("netns removed", path=str(real))


async def remove(path: str | os.PathLike[str]) -> None:
    """Unmount and delete a namespace file; a missing or unmounted file is no error."""
    await asyncio.to_thread(_remove, Path(path))


def _closed(path: Path) -> bool:
    if not path.exists():
        return True
    if is_mounted(path):
        return False
    # The file outlived its mount (say, a reboot with a persistent directory).
    try:
        path.unlink(missing_ok=True)
    except OSError as exc:
        raise _error("remove stale netns file", path, exc.errno or errno.EIO) from exc
    return True


def socket_in(path: str | os.PathLike[str]) -> socket.socket:
    """A TCP socket made inside the network namespace pinned at ``path``.

    Made on a thread of its own that enters the namespace and then ends, like
    :func:`create`'s, so no thread of the daemon is left in a pod's namespace; the
    socket stays in the namespace it was made in."""
    made: list[socket.socket] = []
    failed: list[OSError] = []

    def work() -> None:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                os.setns(fd, os.CLONE_NEWNET)
            finally:
                os.close(fd)
            made.append(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
        except OSError as exc:
            failed.append(exc)

    thread = threading.Thread(target=work, name="netns-socket")
    thread.start()
    thread.join()
    if failed:
        raise _error("open a socket in network namespace", Path(path),
                     failed[0].errno or errno.EIO)
    return made[0]
