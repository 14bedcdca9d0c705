"""Process stdio over fifos, the way containerd's cio package does it for `ctr`.

The client makes three fifos in a private directory and names them in the task's
stdin/stdout/stderr; the shim opens the other ends. Opening a fifo blocks until
both sides are there, and containerd's runc shim opens its ends blocking during
task creation, so our ends are opened in threads started *before* the task is
created. Copying runs in threads too: it is plain blocking I/O on file
descriptors, including the caller's terminal.
"""
from __future__ import annotations

import errno
import os
import shutil
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .tasks import Stdio

DEFAULT_FIFO_DIR = "/run/ctrctl/fifo"
BUF = 32 * 1024


@dataclass
class FifoSet:
    dir: Path
    stdin: str = ""
    stdout: str = ""
    stderr: str = ""
    terminal: bool = False

    @classmethod
    def create(cls, root: str | Path, id: str, *, stdin: bool, stdout: bool = True,
               stderr: bool = True, terminal: bool = False) -> FifoSet:
        os.makedirs(root, mode=0o700, exist_ok=True)
        directory = Path(tempfile.mkdtemp(dir=root))
        fifos = cls(directory, terminal=terminal)
        # With a terminal the pty merges stderr into stdout: no stderr fifo.
        for name, wanted in (("stdin", stdin), ("stdout", stdout),
                             ("stderr", stderr and not terminal)):
            if wanted:
                path = directory / f"{id}-{name}"
                os.mkfifo(path, 0o700)
                setattr(fifos, name, str(path))
        return fifos

    def stdio(self) -> Stdio:
        return Stdio(self.stdin, self.stdout, self.stderr, self.terminal)

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


@dataclass
class Attach:
    """Copies between the caller's fds and a :class:`FifoSet`.

    ``on_stdin_eof`` runs (in the stdin thread) once the caller's stdin ended and
    the fifo was closed; the task must then be told with CloseIO, since a shim may
    hold its own writer open.
    """

    fifos: FifoSet
    stdin_fd: int | None = None
    stdout_fd: int = 1
    stderr_fd: int = 2
    on_stdin_eof: Callable[[], None] | None = None
    _outputs: list[threading.Thread] = field(default_factory=list)
    _opened: dict[str, int] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _cancelled: bool = False

    def start(self) -> None:
        if self.fifos.stdout:
            self._outputs.append(self._spawn(self._copy_out, self.fifos.stdout, self.stdout_fd))
        if self.fifos.stderr:
            self._outputs.append(self._spawn(self._copy_out, self.fifos.stderr, self.stderr_fd))
        if self.fifos.stdin and self.stdin_fd is not None:
            self._spawn(self._copy_in, self.fifos.stdin, self.stdin_fd)

    def _spawn(self, target: Callable[[str, int], None], path: str, fd: int) -> threading.Thread:
        thread = threading.Thread(target=target, args=(path, fd), daemon=True,
                                  name=f"cio-{os.path.basename(path)}")
        thread.start()
        return thread

    def _open(self, path: str, flags: int) -> int | None:
        try:
            fd = os.open(path, flags | os.O_CLOEXEC)
        except OSError:
            return None
        with self._lock:
            if self._cancelled:
                os.close(fd)
                return None
            self._opened[path] = fd
        return fd

    def _close(self, path: str) -> None:
        with self._lock:
            fd = self._opened.pop(path, None)
        if fd is not None:
            os.close(fd)

    def _copy_out(self, path: str, out_fd: int) -> None:
        fifo = self._open(path, os.O_RDONLY)
        if fifo is None:
            return
        try:
            while data := os.read(fifo, BUF):
                try:
                    _write_all(out_fd, data)
                except OSError as exc:
                    if exc.errno != errno.EPIPE:
                        raise
                    # Nobody reads our output any more; keep draining so the
                    # container does not block on a full pipe.
        except OSError:
            pass
        finally:
            self._close(path)

    def _copy_in(self, path: str, in_fd: int) -> None:
        fifo = self._open(path, os.O_WRONLY)
        if fifo is None:
            return
        try:
            while data := os.read(in_fd, BUF):
                _write_all(fifo, data)
        except OSError:
            return  # the process's stdin went away; nothing to tell it
        finally:
            self._close(path)
        if self.on_stdin_eof is not None:
            self.on_stdin_eof()

    def wait(self, timeout: float | None = None) -> None:
        """Wait for the output streams to reach end of file (the process and every
        holder of its stdout have exited)."""
        for thread in self._outputs:
            thread.join(timeout)

    def cancel(self) -> None:
        """Stop waiting for the shim: threads still blocked in open() are released by
        opening the other end ourselves. Threads already copying finish on their own
        (closing an fd under a blocked read would risk reading a reused fd)."""
        with self._lock:
            self._cancelled = True
            opened = set(self._opened)
        for path, flags in ((self.fifos.stdout, os.O_WRONLY), (self.fifos.stderr, os.O_WRONLY),
                            (self.fifos.stdin, os.O_RDONLY)):
            if path and path not in opened:
                try:
                    os.close(os.open(path, flags | os.O_NONBLOCK))
                except OSError:
                    pass
