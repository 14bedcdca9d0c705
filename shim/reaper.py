"""Child reaping for a subreaper process, and running commands under it.

The shim is a child subreaper, so container processes become its children once
runc exits, and the shim must reap every child. A single waitpid(-1) loop does
that. Commands the shim runs itself (runc ...) must therefore not be waited for
by anyone else: ``run`` registers the pid under the same lock the reaping loop
takes, so an exit is either handed to the command's waiter or, for every other
pid, to ``on_exit``.
"""
from __future__ import annotations

import os
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class Exit:
    pid: int
    status: int  # exit code, or 128 + signal number
    timestamp: float  # time.time()


@dataclass(slots=True)
class Result:
    status: int
    output: bytes  # stdout and stderr together, when captured


@dataclass(slots=True)
class _Waiter:
    done: threading.Event = field(default_factory=threading.Event)
    status: int = -1


def exit_status(wait_status: int) -> int:
    if os.WIFSIGNALED(wait_status):
        return 128 + os.WTERMSIG(wait_status)
    if os.WIFEXITED(wait_status):
        return os.WEXITSTATUS(wait_status)
    return -1


class Reaper:
    def __init__(self, on_exit: Callable[[Exit], None], active: bool = True) -> None:
        # Inactive: nobody runs reap() (the short-lived ``delete`` action), so
        # commands are waited for directly.
        self._active = active
        self._on_exit = on_exit
        self._lock = threading.Lock()
        self._waiters: dict[int, _Waiter] = {}

    def reap(self) -> None:
        """Collect every exited child; call on SIGCHLD (signals coalesce, so loop)."""
        while True:
            with self._lock:
                try:
                    pid, status = os.waitpid(-1, os.WNOHANG)
                except ChildProcessError:
                    return
                if pid == 0:
                    return
                waiter = self._waiters.pop(pid, None)
            if waiter is not None:
                waiter.status = exit_status(status)
                waiter.done.set()
            else:
                self._on_exit(Exit(pid, exit_status(status), time.time()))

    def start(self, argv: Sequence[str], **popen: object) -> tuple[subprocess.Popen[bytes], _Waiter]:
        with self._lock:
            proc = subprocess.Popen(argv, **popen)  # type: ignore[call-overload]
            waiter = _Waiter()
            self._waiters[proc.pid] = waiter
        return proc, waiter

    def wait(self, proc: subprocess.Popen[bytes], waiter: _Waiter) -> int:
        if not self._active:
            with self._lock:
                self._waiters.pop(proc.pid, None)
            _, status = os.waitpid(proc.pid, 0)
            waiter.status = exit_status(status)
            waiter.done.set()
        waiter.done.wait()
        # Tell Popen the child is gone, or its finalizer would waitpid() the pid
        # again, possibly stealing a reused pid from the reaping loop.
        proc.returncode = waiter.status
        return waiter.status

    def run(
        self,
        argv: Sequence[str],
        input: bytes | None = None,
        stdin: int | None = None,
        stdout: int | None = None,
        stderr: int | None = None,
        capture: bool = True,
        env: dict[str, str] | None = None,
    ) -> Result:
        """Run a command to completion. With ``capture``, its stdout and stderr
        are collected together; explicit fds (for a container's stdio) win."""
        if input is not None:
            stdin = subprocess.PIPE
        elif stdin is None:
            stdin = subprocess.DEVNULL
        if capture and stdout is None:
            stdout = subprocess.PIPE
            stderr = subprocess.STDOUT if stderr is None else stderr
        elif stdout is None:
            stdout = subprocess.DEVNULL
        if stderr is None:
            stderr = subprocess.DEVNULL
        proc, waiter = self.start(argv, stdin=stdin, stdout=stdout, stderr=stderr, env=env)
        if proc.stdin is not None:
            try:
                proc.stdin.write(input or b"")
            except BrokenPipeError:
                pass
            proc.stdin.close()
        output = b""
        if proc.stdout is not None:
            output = proc.stdout.read()
            proc.stdout.close()
        return Result(self.wait(proc, waiter), output)
