"""A task's processes: the container's init process and processes exec'd into it.

Each process is a small state machine (created -> running <-> paused -> stopped ->
deleted); an operation that its state forbids raises FailedPrecondition, as the
runc shim refuses them.
"""
from __future__ import annotations

import errno
import json
import os
import selectors
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from ctrd import errors
from ctrd.shim.log import Logger
from ctrd.shim.mount import unmount_all
from ctrd.shim.runc import Runc
from ctrd.shim.stdio import Console, ConsoleSocket, PipeIO, Stdio

CREATED, RUNNING, PAUSED, STOPPED, DELETED = "created", "running", "paused", "stopped", "deleted"
IO_DRAIN_TIMEOUT = 2.0


def read_pid_file(path: str) -> int:
    with open(path) as f:
        return int(f.read().strip())


@dataclass(slots=True)
class IOOptions:
    uid: int = 0
    gid: int = 0
    selector: selectors.BaseSelector | None = None  # the shim's main loop (stdin waits there)


class Process:
    """What init and exec processes share: stdio, exit bookkeeping, waiting."""

    def __init__(self, id: str, stdio: Stdio, log: Logger) -> None:
        self.id = id
        self.stdio = stdio
        self.log = log
        self.pid = 0
        self.exit_status = 0
        self.exited_at: float | None = None
        self.state = CREATED
        self.lock = threading.RLock()
        self._exited = threading.Event()
        self.io: PipeIO | None = None
        self.console: Console | None = None
        # CloseIO may come before the process started (a client whose input is
        # already exhausted); the stdin fifo is then closed as soon as it is opened.
        self._stdin_closed = False

    def _refuse(self, what: str) -> errors.CtrdError:
        if self.state == DELETED:
            return errors.NotFound(f"cannot {what} a deleted process")
        return errors.FailedPrecondition(f"cannot {what} a {self.state} process")

    def wait(self, timeout: float | None = None) -> bool:
        return self._exited.wait(timeout)

    @property
    def has_exited(self) -> bool:
        return self._exited.is_set()

    def status(self) -> str:
        return STOPPED if self.state == DELETED else self.state

    def set_exited(self, status: int, when: float) -> None:
        with self.lock:
            if self._exited.is_set():
                return
            self.exit_status = status
            self.exited_at = when
            if self.state != DELETED:
                self.state = STOPPED
            if self.console is not None:
                self.console.shutdown()
            self._exited.set()

    def resize(self, width: int, height: int) -> None:
        with self.lock:
            # A client resizing as the task exits is normal for init; only an exec
            # that is gone refuses (as the runc shim does).
            if isinstance(self, Exec) and self.state in (STOPPED, DELETED):
                raise self._refuse("resize")
            if self.console is not None:
                self.console.resize(width, height)

    def close_stdin(self) -> None:
        self._stdin_closed = True
        holder = self.console if self.console is not None else self.io
        if holder is not None and holder.stdin_fifo is not None:
            holder.stdin_fifo.close_writer()

    def _start_stdin(self) -> None:
        holder = self.console if self.console is not None else self.io
        if holder is not None:
            holder.start_stdin()
        if self._stdin_closed:
            self.close_stdin()

    def _open_stdio(self, runc_call: Callable[[str | None, tuple[int, int, int]], None],
                    io_opts: IOOptions) -> None:
        """Run a runc verb that starts a process, wiring its stdio (pipes or a pty)."""
        sock = ConsoleSocket() if self.stdio.terminal else None
        io = None if sock else PipeIO(self.stdio, io_opts.uid, io_opts.gid, self.log,
                                      io_opts.selector)
        try:
            if sock is not None:
                devnull = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
                try:
                    runc_call(sock.path, (devnull, devnull, devnull))
                finally:
                    os.close(devnull)
                self.console = Console(sock.receive_master(), self.stdio, self.log,
                                       io_opts.selector)
            else:
                assert io is not None
                runc_call(None, io.fds)
                io.start_copy()
                self.io = io
        except BaseException:
            if io is not None:
                io.close()
            raise
        finally:
            if sock is not None:
                sock.close()

    def _release_stdio(self) -> None:
        if self.io is not None:
            self.io.wait(IO_DRAIN_TIMEOUT)
            self.io.close()
        if self.console is not None:
            self.console.close()


class Init(Process):
    def __init__(self, id: str, bundle: str, runc: Runc, stdio: Stdio, rootfs: str,
                 log: Logger, io_opts: IOOptions, no_pivot: bool = False,
                 no_new_keyring: bool = False) -> None:
        super().__init__(id, stdio, log)
        self.bundle = bundle
        self.runc = runc
        self.rootfs = rootfs
        self.io_opts = io_opts
        self.no_pivot = no_pivot
        self.no_new_keyring = no_new_keyring
        self.pausing = False

    @property
    def pid_file(self) -> str:
        return os.path.join(self.bundle, "init.pid")

    def status(self) -> str:
        if self.pausing:
            return "pausing"
        return super().status()

    def create(self) -> None:
        self._open_stdio(
            lambda console, fds: self.runc.create(
                self.id, self.bundle, self.pid_file, console, fds,
                no_pivot=self.no_pivot, no_new_keyring=self.no_new_keyring),
            self.io_opts)
        self.pid = read_pid_file(self.pid_file)

    def start(self) -> None:
        with self.lock:
            if self.state != CREATED:
                raise self._refuse("start")
            self.runc.start(self.id)
            self._start_stdin()
            if self.state == CREATED:  # it may already have exited (and be STOPPED)
                self.state = RUNNING

    def kill(self, signal: int, all: bool) -> None:
        with self.lock:
            if self.state == DELETED:
                raise self._refuse("kill")
            self.runc.kill(self.id, signal, all)

    def kill_all(self) -> None:
        try:
            self.runc.kill(self.id, 9, all=True)
        except errors.CtrdError as exc:
            self.log.debug("kill_all_failed", error=str(exc))

    def delete(self) -> None:
        with self.lock:
            if self.state not in (CREATED, STOPPED):
                raise self._refuse("delete")
            self._release_stdio()
            error: BaseException | None = None
            try:
                self.runc.delete(self.id, force=self.state == CREATED)
            except errors.CtrdError as exc:
                error = exc
            try:
                unmount_all(self.rootfs)
            except OSError as exc:
                self.log.warning("rootfs_unmount_failed", error=str(exc))
                error = error or errors.Internal(f"failed rootfs umount: {exc}")
            self.state = DELETED
            if self.exited_at is None:
                self.exited_at = time.time()
            if error is not None:
                raise error

    def pause(self) -> None:
        with self.lock:
            if self.state != RUNNING:
                raise self._refuse("pause")
            self.pausing = True
            try:
                self.runc.pause(self.id)
            finally:
                self.pausing = False
            self.state = PAUSED

    def resume(self) -> None:
        with self.lock:
            if self.state != PAUSED:
                raise self._refuse("resume")
            self.runc.resume(self.id)
            self.state = RUNNING

    def update(self, resources_json: bytes) -> None:
        with self.lock:
            if self.state not in (CREATED, RUNNING, PAUSED):
                raise self._refuse("update")
            self.runc.update(self.id, resources_json)

    def set_exited(self, status: int, when: float) -> None:
        with self.lock:
            if self.state == PAUSED:
                # a frozen cgroup would keep the rest of the container stuck
                try:
                    self.runc.resume(self.id)
                except errors.CtrdError as exc:
                    self.log.warning("resume_after_exit_failed", error=str(exc))
            super().set_exited(status, when)

    def exec(self, exec_id: str, stdio: Stdio, spec_json: bytes) -> Exec:
        with self.lock:
            if self.state not in (CREATED, RUNNING):
                raise errors.FailedPrecondition(f"cannot exec in a {self.status()} state")
            try:
                spec = json.loads(spec_json)
            except ValueError as exc:
                raise errors.InvalidArgument(f"exec spec is not valid JSON: {exc}") from None
            spec["terminal"] = stdio.terminal
            return Exec(exec_id, self, stdio, spec, self.log.bind(exec_id=exec_id))


class Exec(Process):
    def __init__(self, id: str, parent: Init, stdio: Stdio, spec: dict[str, object],
                 log: Logger) -> None:
        super().__init__(id, stdio, log)
        self.parent = parent
        self.spec = spec

    @property
    def pid_file(self) -> str:
        return os.path.join(self.parent.bundle, f"{self.id}.pid")

    def status(self) -> str:
        parent = self.parent.status()
        if parent in ("paused", "pausing"):
            return parent
        return super().status()

    def start(self) -> None:
        with self.lock:
            if self.state != CREATED:
                raise self._refuse("start")
            import tempfile  # only execs need it; the shim's start-up should not pay

            fd, spec_file = tempfile.mkstemp(prefix=".exec-", suffix=".json",
                                             dir=self.parent.bundle)
            try:
                with os.fdopen(fd, "w") as f:
                    json.dump(self.spec, f)
                self._open_stdio(
                    lambda console, fds: self.parent.runc.exec(
                        self.parent.id, spec_file, self.pid_file, console, fds),
                    self.parent.io_opts)
                self.pid = read_pid_file(self.pid_file)
                self._start_stdin()
            except BaseException:
                self._exited.set()  # nobody may wait forever on a process that never ran
                raise
            finally:
                os.unlink(spec_file)
            if self.state == CREATED:
                self.state = RUNNING

    def kill(self, signal: int, all: bool) -> None:
        with self.lock:
            if self.state == DELETED:
                raise self._refuse("kill")
            if self.pid == 0:
                raise errors.FailedPrecondition("process not created")
            if self.has_exited:
                raise errors.NotFound("process already finished")
            try:
                os.kill(self.pid, signal)
            except OSError as exc:
                if exc.errno == errno.ESRCH:
                    raise errors.NotFound("process already finished") from None
                raise

    def delete(self) -> None:
        with self.lock:
            if self.state == RUNNING:
                raise self._refuse("delete")
            if self.state == DELETED:
                raise self._refuse("delete")
            self._release_stdio()
            try:
                os.unlink(self.pid_file)
            except FileNotFoundError:
                pass
            self.state = DELETED
