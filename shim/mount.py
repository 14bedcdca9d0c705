"""Mounting a task's rootfs (the mounts in CreateTaskRequest) and tearing it down."""
from __future__ import annotations

import ctypes
import errno
import os
import time
from dataclasses import dataclass

MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_SYNCHRONOUS = 0x10
MS_REMOUNT = 0x20
MS_MANDLOCK = 0x40
MS_DIRSYNC = 0x80
MS_NOATIME = 0x400
MS_NODIRATIME = 0x800
MS_BIND = 0x1000
MS_REC = 0x4000
MS_SILENT = 0x8000
MS_UNBINDABLE = 1 << 17
MS_PRIVATE = 1 << 18
MS_SLAVE = 1 << 19
MS_SHARED = 1 << 20
MS_RELATIME = 1 << 21
MS_STRICTATIME = 1 << 24
PROPAGATION = MS_SHARED | MS_PRIVATE | MS_SLAVE | MS_UNBINDABLE

# option -> (clear the flag instead of setting it, flag)
FLAGS: dict[str, tuple[bool, int]] = {
    "async": (True, MS_SYNCHRONOUS), "atime": (True, MS_NOATIME), "bind": (False, MS_BIND),
    "defaults": (False, 0), "dev": (True, MS_NODEV), "diratime": (True, MS_NODIRATIME),
    "dirsync": (False, MS_DIRSYNC), "exec": (True, MS_NOEXEC), "mand": (False, MS_MANDLOCK),
    "noatime": (False, MS_NOATIME), "nodev": (False, MS_NODEV),
    "nodiratime": (False, MS_NODIRATIME), "noexec": (False, MS_NOEXEC),
    "nomand": (True, MS_MANDLOCK), "norelatime": (True, MS_RELATIME),
    "nostrictatime": (True, MS_STRICTATIME), "nosuid": (False, MS_NOSUID),
    "rbind": (False, MS_BIND | MS_REC), "relatime": (False, MS_RELATIME),
    "remount": (False, MS_REMOUNT), "ro": (False, MS_RDONLY), "rw": (True, MS_RDONLY),
    "strictatime": (False, MS_STRICTATIME), "suid": (True, MS_NOSUID),
    "sync": (False, MS_SYNCHRONOUS), "private": (False, MS_PRIVATE),
    "rprivate": (False, MS_PRIVATE | MS_REC), "shared": (False, MS_SHARED),
    "rshared": (False, MS_SHARED | MS_REC), "slave": (False, MS_SLAVE),
    "rslave": (False, MS_SLAVE | MS_REC), "unbindable": (False, MS_UNBINDABLE),
    "runbindable": (False, MS_UNBINDABLE | MS_REC),
}


@dataclass(frozen=True, slots=True)
class Mount:
    type: str
    source: str
    options: tuple[str, ...] = ()


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def parse_options(options: tuple[str, ...]) -> tuple[int, str]:
    flags = 0
    data = []
    for opt in options:
        known = FLAGS.get(opt)
        if known is None:
            data.append(opt)
        elif known[0]:
            flags &= ~known[1]
        else:
            flags |= known[1]
    return flags, ",".join(data)


def _mount(libc: ctypes.CDLL, source: str, target: str, fstype: str, flags: int, data: str) -> None:
    if libc.mount(source.encode(), target.encode(), fstype.encode(), ctypes.c_ulong(flags),
                  data.encode() if data else None) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount {source} ({fstype}) on {target}: {os.strerror(err)}")


def mount(m: Mount, target: str) -> None:
    libc = _libc()
    flags, data = parse_options(m.options)
    chdir = None
    if m.type == "overlay" and len(data) >= os.sysconf("SC_PAGE_SIZE") - 512:
        chdir, data = _compact_lowerdirs(data)
    plain = flags & ~PROPAGATION
    if not flags & MS_REMOUNT or data:
        cwd = os.open(".", os.O_RDONLY | os.O_DIRECTORY) if chdir else None
        try:
            if chdir:
                os.chdir(chdir)
            _mount(libc, m.source, target, m.type, plain, data)
        finally:
            if cwd is not None:
                os.fchdir(cwd)
                os.close(cwd)
    if flags & PROPAGATION:
        _mount(libc, "", target, "", flags & (PROPAGATION | MS_REC | MS_SILENT), "")
    if plain & (MS_BIND | MS_RDONLY) == MS_BIND | MS_RDONLY:
        # a bind mount ignores MS_RDONLY until remounted
        _mount(libc, "", target, "", plain | MS_REMOUNT, "")


def _compact_lowerdirs(data: str) -> tuple[str | None, str]:
    """Shorten long overlay lowerdir lists by making them relative to their common parent
    (the kernel limits mount data to one page); the mount then runs from that directory."""
    opts = data.split(",")
    idx = next((i for i, o in enumerate(opts) if o.startswith("lowerdir=")), None)
    if idx is None:
        return None, data
    dirs = opts[idx][len("lowerdir="):].split(":")
    if len(dirs) < 2:
        return None, data
    common = os.path.commonpath(dirs)
    # snapshot dirs look like .../snapshots/<n>/fs: strip to the snapshots folder
    common = os.path.dirname(os.path.dirname(dirs[0])) if common in dirs else common
    if not all(d.startswith(common + "/") for d in dirs):
        return None, data
    opts[idx] = "lowerdir=" + ":".join(os.path.relpath(d, common) for d in dirs)
    return common, ",".join(opts)


def unmount_all(target: str) -> None:
    """Unmount everything stacked on ``target`` (missing target: nothing to do)."""
    if not target or not os.path.exists(target):
        return
    libc = _libc()
    while True:
        for _ in range(50):
            if libc.umount2(target.encode(), 0) == 0:
                break
            err = ctypes.get_errno()
            if err == errno.EBUSY:
                time.sleep(0.05)
                continue
            if err == errno.EINVAL:  # not a mount point (any more)
                return
            raise OSError(err, f"unmount {target}: {os.strerror(err)}")
        else:
            raise OSError(errno.EBUSY, f"unmount {target}: {os.strerror(errno.EBUSY)}")
