"""A process's stdio: the pipes or pty runc gets, and the copying to the client's fifos.

Clients name stdio with paths of fifos they created (``ctr`` does), ``file://``
paths, or nothing. The shim owns the copying so the client may come and go.

Fifo rules that matter:
- output fifos are opened read-write: the open never blocks and writes never fail
  with EPIPE while the client is away;
- the stdin fifo gets a reader (copied into the process) and a writer held by the
  shim, so the process only sees EOF once the client closed its end *and* asked
  for it with CloseIO.
"""
from __future__ import annotations

import fcntl
import os
import select
import selectors
import socket
import struct
import termios
import threading
from dataclasses import dataclass

from ctrd import errors
from ctrd.shim.log import Logger

BUF = 1 << 16


@dataclass(frozen=True, slots=True)
class Stdio:
    stdin: str = ""
    stdout: str = ""
    stderr: str = ""
    terminal: bool = False

    def is_null(self) -> bool:
        return not (self.stdin or self.stdout or self.stderr)


def _close(fd: int | None) -> None:
    if fd is not None and fd >= 0:
        try:
            os.close(fd)
        except OSError:
            pass


def _open_output(target: str) -> int:
    """An fd to write a stream to: a fifo (scheme-less or fifo://) or a file:// path."""
    if ":" not in target:  # a plain fifo path, what ctr sends: no need to parse
        return os.open(target, os.O_RDWR | os.O_CLOEXEC)
    from urllib.parse import urlparse  # imported on use: it costs the shim's start-up

    uri = urlparse(target)
    if uri.scheme == "file":
        os.makedirs(os.path.dirname(uri.path) or "/", exist_ok=True)
        return os.open(uri.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
    if uri.scheme not in ("", "fifo"):
        raise errors.InvalidArgument(f"unsupported stdio scheme {uri.scheme!r} in {target}")
    return os.open(uri.path if uri.scheme else target, os.O_RDWR | os.O_CLOEXEC)


class StdinFifo:
    """The read end copied into the process, plus the shim's own write end."""

    def __init__(self, path: str) -> None:
        self.reader = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        os.set_blocking(self.reader, True)
        self._holder: int | None = os.open(path, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        self._lock = threading.Lock()

    def close_writer(self) -> None:
        with self._lock:
            fd, self._holder = self._holder, None
        _close(fd)


def _copy_chunk(src: int, dst: int, log: Logger, name: str) -> bool:
    """Copy what ``src`` has now; False once it ended or ``dst`` failed."""
    try:
        data = os.read(src, BUF)
    except OSError:  # EIO on a pty once the last slave fd is gone
        return False
    if not data:
        return False
    view = memoryview(data)
    try:
        while view:
            view = view[os.write(dst, view):]
    except OSError as exc:
        log.debug("stdio_copy_stopped", stream=name, error=str(exc))
        return False
    return True


def _copy(src: int, dst: int, log: Logger, name: str) -> None:
    """Copy until ``src`` ends, then close both."""
    try:
        while _copy_chunk(src, dst, log, name):
            pass
    finally:
        _close(src)
        _close(dst)


def _thread(target: object, *args: object) -> threading.Thread:
    t = threading.Thread(target=target, args=args, daemon=True)  # type: ignore[arg-type]
    t.start()
    return t


class _StdinCopy:
    """Copies a client's stdin fifo into the process, on a thread started only once
    the fifo first becomes readable (data, or EOF after CloseIO): most clients never
    write (``ctr run -d`` names a stdin fifo all the same), and a thread waiting for
    nothing would cost the shim ~36 KiB. Until then the shim's main loop watches it."""

    def __init__(self, src: int, dst: int, log: Logger,
                 selector: selectors.BaseSelector | None) -> None:
        self._src, self._dst, self._log = src, dst, log
        self._selector = selector
        self._lock = threading.Lock()
        self._waiting = selector is not None
        if selector is None:
            self._start()
        else:
            selector.register(src, selectors.EVENT_READ, self._readable)

    def _readable(self, fd: int) -> None:  # on the main loop
        if self._stop_waiting():
            self._start()

    def _start(self) -> None:
        _thread(_copy, self._src, self._dst, self._log, "stdin")

    def _stop_waiting(self) -> bool:
        with self._lock:
            if not self._waiting:
                return False
            self._waiting = False
            assert self._selector is not None
            self._selector.unregister(self._src)
            return True

    def cancel(self) -> None:
        """The process is done: release both ends if no thread ever took them."""
        if self._stop_waiting():
            _close(self._src)
            _close(self._dst)


class PipeIO:
    """Pipes between runc (the process's fds 0-2) and the client's stdio."""

    def __init__(self, stdio: Stdio, uid: int, gid: int, log: Logger,
                 selector: selectors.BaseSelector | None = None) -> None:
        self.stdio = stdio
        self._log = log
        self._selector = selector  # the main loop's, for waiting on stdin
        self._stdin_copy: _StdinCopy | None = None
        self._copier: threading.Thread | None = None  # copies stdout and stderr
        self.stdin_fifo: StdinFifo | None = None
        self._process_fds: list[int] = []  # ends given to runc, closed once it started
        self._stdin_w: int | None = None
        self._readers: dict[str, int] = {}  # stream name -> our read end
        self._outputs: dict[str, int] = {}  # destination -> fd (stdout and stderr may share)
        devnull = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
        self._process_fds.append(devnull)
        fds = [devnull, devnull, devnull]
        try:
            if stdio.stdin:
                r, self._stdin_w = os.pipe2(os.O_CLOEXEC)
                os.fchown(r, uid, gid)
                fds[0] = r
                self._process_fds.append(r)
            for i, name, target in ((1, "stdout", stdio.stdout), (2, "stderr", stdio.stderr)):
                if not target:
                    continue
                r, w = os.pipe2(os.O_CLOEXEC)
                os.fchown(w, uid, gid)
                fds[i] = w
                self._process_fds.append(w)
                self._readers[name] = r
                if target not in self._outputs:
                    self._outputs[target] = _open_output(target)
        except BaseException:
            self.close()
            raise
        self.fds = (fds[0], fds[1], fds[2])

    def start_copy(self) -> None:
        """Begin copying; call once runc has started the process with ``fds``."""
        for fd in self._process_fds:
            _close(fd)
        self._process_fds = []
        if self._readers:
            self._copier = _thread(self._copy_outputs)

    def _copy_outputs(self) -> None:
        """stdout and stderr on one thread (each thread costs a shim ~36 KiB). Writes
        block, so a client that stops reading one stream holds up the other too, as
        the process itself would be held up by its full pipe. A destination both
        streams share is closed after the second one ends."""
        targets = {"stdout": self.stdio.stdout, "stderr": self.stdio.stderr}
        names = {fd: name for name, fd in self._readers.items()}
        copying = {fd: self._outputs[targets[name]] for name, fd in self._readers.items()}
        try:
            while copying:
                ready, _, _ = select.select(list(copying), [], [])
                for src in ready:
                    if not _copy_chunk(src, copying[src], self._log, names[src]):
                        dst = copying.pop(src)
                        _close(src)
                        if dst not in copying.values():
                            _close(dst)
        finally:
            for fd in {*copying, *copying.values()}:
                _close(fd)

    def start_stdin(self) -> None:
        """Begin feeding the process's stdin. Deferred until the process starts so a
        client's stdin EOF cannot arrive before it is able to ask for CloseIO."""
        if self._stdin_w is None:
            return
        self.stdin_fifo = StdinFifo(self.stdio.stdin)
        w, self._stdin_w = self._stdin_w, None
        self._stdin_copy = _StdinCopy(self.stdin_fifo.reader, w, self._log, self._selector)

    def wait(self, timeout: float) -> None:
        """Give the output copies time to drain after the process exited."""
        if self._copier is not None:
            self._copier.join(timeout)

    def close(self) -> None:
        """Release whatever was never handed to a copying thread."""
        unused = [] if self._copier is not None else [*self._readers.values(), *self._outputs.values()]
        for fd in [*self._process_fds, *unused, self._stdin_w]:
            _close(fd)
        self._process_fds, self._stdin_w = [], None
        if self.stdin_fifo is not None:
            self.stdin_fifo.close_writer()
        if self._stdin_copy is not None:
            self._stdin_copy.cancel()


class ConsoleSocket:
    """The unix socket runc sends the pty master through (--console-socket)."""

    def __init__(self) -> None:
        import tempfile  # imported on use: it costs the shim's start-up

        self._dir = tempfile.mkdtemp(prefix="pty")
        self.path = os.path.join(self._dir, "pty.sock")
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self._sock.bind(self.path)
        self._sock.listen(1)

    def receive_master(self, timeout: float = 30.0) -> int:
        self._sock.settimeout(timeout)
        conn, _ = self._sock.accept()
        with conn:
            conn.settimeout(timeout)
            _msg, fds, _flags, _addr = socket.recv_fds(conn, 4096, 1)
        if not fds:
            raise errors.Internal("runc sent no pty master over the console socket")
        os.set_inheritable(fds[0], False)
        return fds[0]

    def close(self) -> None:
        self._sock.close()
        try:
            os.unlink(self.path)
            os.rmdir(self._dir)
        except OSError:
            pass


class Console:
    """Copies between a pty master and the client's fifos."""

    def __init__(self, master: int, stdio: Stdio, log: Logger,
                 selector: selectors.BaseSelector | None = None) -> None:
        self.master = master
        self._log = log
        self._selector = selector
        self._stdin_copy: _StdinCopy | None = None
        self.stdin_fifo: StdinFifo | None = None
        self._stop_r, self._stop_w = os.pipe2(os.O_CLOEXEC)
        self._out = _open_output(stdio.stdout) if stdio.stdout else None
        self._done = threading.Event()
        self._closed = False
        self._lock = threading.Lock()
        self._stdin_path = stdio.stdin
        self._out_thread = _thread(self._copy_out)

    def start_stdin(self) -> None:
        """Begin feeding the pty (deferred like PipeIO.start_stdin)."""
        if not self._stdin_path or self.stdin_fifo is not None:
            return
        self.stdin_fifo = StdinFifo(self._stdin_path)
        self._stdin_copy = _StdinCopy(self.stdin_fifo.reader, os.dup(self.master), self._log,
                                      self._selector)

    def _copy_out(self) -> None:
        try:
            while True:
                ready, _, _ = select.select([self.master, self._stop_r], [], [])
                if self.master in ready:
                    if not self._pump(blocking_ok=True):
                        return
                elif self._stop_r in ready:
                    # The process exited: forward what is still buffered, then stop,
                    # even if a leftover process keeps the pty open.
                    os.set_blocking(self.master, False)
                    while self._pump(blocking_ok=False):
                        pass
                    return
        finally:
            if self._out is not None:
                _close(self._out)
            self._done.set()

    def _pump(self, blocking_ok: bool) -> bool:
        try:
            data = os.read(self.master, BUF)
        except (BlockingIOError, OSError):
            return False
        if not data:
            return False
        if self._out is not None:
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(self._out, view):]
            except OSError:
                self._out = None
        return True

    def resize(self, width: int, height: int) -> None:
        with self._lock:
            if self._closed:
                return
            fcntl.ioctl(self.master, termios.TIOCSWINSZ, struct.pack("HHHH", height, width, 0, 0))

    def shutdown(self) -> None:
        """The process exited: flush and stop copying output."""
        try:
            os.write(self._stop_w, b"x")
        except OSError:
            pass

    def wait(self, timeout: float) -> None:
        self._done.wait(timeout)

    def close(self) -> None:
        self.shutdown()
        self._done.wait(2)
        with self._lock:
            if self._closed:
                return
            self._closed = True
        if self.stdin_fifo is not None:
            self.stdin_fifo.close_writer()
        if self._stdin_copy is not None:
            self._stdin_copy.cancel()
        for fd in (self.master, self._stop_r, self._stop_w):
            _close(fd)
