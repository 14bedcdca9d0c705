"""Unmounting what a shim left on a bundle's rootfs, for cleanup after a dead shim."""
from __future__ import annotations

import ctypes
import errno
import os

_libc = ctypes.CDLL(None, use_errno=True)
_MNT_DETACH = 2


def unmount_all(target: str, detach: bool = False) -> None:
    """Unmount every mount stacked on ``target``; a target that is not a mount is fine."""
    flags = _MNT_DETACH if detach else 0
    while True:
        if _libc.umount2(os.fsencode(target), flags) == 0:
            continue
        err = ctypes.get_errno()
        if err in (errno.EINVAL, errno.ENOENT):
            return
        raise OSError(err, f"unmount {target}: {os.strerror(err)}")


def is_mounted(target: str) -> bool:
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == target for line in f)
