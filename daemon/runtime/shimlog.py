"""The ``log`` FIFO in a bundle: the long-lived shim writes its log there.

A shim opens the FIFO for writing and blocks until a reader exists, so the daemon
creates it before ``start`` and holds it open read-write (never blocking, never
seeing end-of-file) for as long as it follows the shim, relaying lines to its log.
"""
from __future__ import annotations

import asyncio
import contextlib
import os
import stat

import structlog

from .bundle import Bundle

log = structlog.get_logger()
_MAX_LINE = 64 << 10


class ShimLog:
    def __init__(self, bundle: Bundle) -> None:
        self._log = log.bind(id=bundle.id, namespace=bundle.namespace, source="shim")
        path = bundle.file("log")
        try:
            os.mkfifo(path, 0o700)
        except FileExistsError:
            if not stat.S_ISFIFO(os.lstat(path).st_mode):
                raise
        self._fd: int | None = os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        self._buf = b""
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self._fd, self._on_readable)

    def _on_readable(self) -> None:
        if self._fd is None:
            return
        try:
            chunk = os.read(self._fd, 65536)
        except BlockingIOError:
            return
        except OSError:
            self.close()
            return
        self._buf += chunk
        *lines, self._buf = self._buf.split(b"\n")
        if len(self._buf) > _MAX_LINE:
            lines.append(self._buf)
            self._buf = b""
        for line in lines:
            if line.strip():
                self._log.info("shim log", line=line.decode(errors="replace").rstrip())

    def close(self) -> None:
        if self._fd is None:
            return
        with contextlib.suppress(Exception):
            self._loop.remove_reader(self._fd)
        os.close(self._fd)
        self._fd = None
