"""Mount records as snapshotters return them, and mounting them inside the daemon.

The daemon mounts snapshots only briefly (applying or comparing layers), from worker
threads. It therefore cannot shorten a long overlay ``lowerdir`` list the way
containerd's helper does, by changing directory first: the working directory is
shared by all threads. It opens the common parent directory instead and names the
layers through ``/proc/self/fd/<n>/...``, which the kernel resolves at mount time.
The shim, a process of its own, does the chdir form (shim/mount.py).
"""
from __future__ import annotations

import ctypes
import errno
import os
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

from ctrd.shim.mount import MS_BIND, MS_RDONLY, MS_REMOUNT, PROPAGATION, parse_options

# Mount data beyond this many bytes would not fit the kernel's one page of options.
_DATA_LIMIT = os.sysconf("SC_PAGE_SIZE") - 1


@dataclass(frozen=True)
class Mount:
    type: str
    source: str
    options: tuple[str, ...] = ()

    def option(self, prefix: str) -> str | None:
        """The value of the first ``prefix=value`` option, if any."""
        for opt in self.options:
            if opt.startswith(prefix + "="):
                return opt[len(prefix) + 1:]
        return None

    @property
    def readonly(self) -> bool:
        return "ro" in self.options


def layers(mounts: Sequence[Mount]) -> list[str] | None:
    """The directories, top first, whose union one mount shows; None if not a simple union."""
    if len(mounts) != 1:
        return None
    m = mounts[0]
    if m.type == "bind" or "bind" in m.options or "rbind" in m.options:
        return [m.source]
    if m.type == "overlay":
        lower = m.option("lowerdir")
        upper = m.option("upperdir")
        dirs = lower.split(":") if lower else []
        return ([upper] if upper else []) + dirs
    return None


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _call_mount(source: str, target: str, fstype: str, flags: int, data: str) -> None:
    if _libc().mount(source.encode(), target.encode(), fstype.encode(), ctypes.c_ulong(flags),
                     data.encode() if data else None) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount {source} ({fstype}) on {target}: {os.strerror(err)}")


def _shorten_lowerdirs(data: str) -> tuple[str, int | None]:
    """Rewrite lowerdirs relative to an open fd of their common parent when too long."""
    opts = data.split(",")
    for i, opt in enumerate(opts):
        if not opt.startswith("lowerdir="):
            continue
        dirs = opt[len("lowerdir="):].split(":")
        common = os.path.commonpath(dirs)
        if common in dirs:
            common = os.path.dirname(common)
        fd = os.open(common, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        prefix = f"/proc/self/fd/{fd}/"
        opts[i] = "lowerdir=" + ":".join(prefix + os.path.relpath(d, common) for d in dirs)
        return ",".join(opts), fd
    return data, None


def mount(m: Mount, target: str) -> None:
    flags, data = parse_options(m.options)
    fd = None
    if m.type == "overlay" and len(data) > _DATA_LIMIT:
        data, fd = _shorten_lowerdirs(data)
    try:
        plain = flags & ~PROPAGATION
        _call_mount(m.source, target, m.type, plain, data)
        if plain & (MS_BIND | MS_RDONLY) == MS_BIND | MS_RDONLY:
            # A bind mount ignores MS_RDONLY until it is remounted.
            _call_mount("", target, "", plain | MS_REMOUNT, "")
    finally:
        if fd is not None:
            os.close(fd)


def unmount(target: str) -> None:
    libc = _libc()
    for _ in range(100):
        if libc.umount2(target.encode(), 0) == 0:
            continue  # something may be stacked below: go on until EINVAL
        err = ctypes.get_errno()
        if err == errno.EINVAL:
            return
        if err != errno.EBUSY:
            raise OSError(err, f"unmount {target}: {os.strerror(err)}")
        time.sleep(0.02)
    raise OSError(errno.EBUSY, f"unmount {target}: {os.strerror(errno.EBUSY)}")


@contextmanager
def temp_mount(mounts: Sequence[Mount], parent: str, *, readonly: bool = False) -> Iterator[str]:
    """Mount ``mounts`` on a fresh directory under ``parent``; always unmounted after."""
    os.makedirs(parent, exist_ok=True)
    target = tempfile.mkdtemp(prefix="mount-", dir=parent)
    try:
        for m in mounts:
            if readonly and "ro" not in m.options:
                m = Mount(m.type, m.source, tuple(o for o in m.options if o != "rw") + ("ro",))
            mount(m, target)
        yield target
    finally:
        unmount(target)
        os.rmdir(target)
