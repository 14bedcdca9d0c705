"""The shim zygote, from the daemon's side: run it beside the task manager, ask it for shims.

Our shim binary can run as a warm process that forks ready shims on request
(``containerd-shim-ctrd-v2 zygote``, see :mod:`ctrd.shim.zygote`), which answers
in milliseconds where exec'ing ``start`` costs an interpreter start. The daemon runs
one while it lives and falls back to ``start`` whenever it does not answer: a
zygote that died is not restarted, shims keep starting, only slower.
"""
from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from pathlib import Path

import structlog

from ctrd.shim.zygote import NAME, SpawnRequest, spawn_via_zygote

log = structlog.get_logger()

SOCKET_NAME = "shim-zygote.sock"
# A zygote left by a daemon that just died still holds the socket for up to a second
# (it polls for its parent's death), so a refusal is retried a few times.
RETRY_DELAY = 1.0
START_ATTEMPTS = 5
STOP_TIMEOUT = 5.0
SUN_PATH_MAX = 107  # sockaddr_un.sun_path less the terminating NUL


def is_zygote_capable(binary: str) -> bool:
    return os.path.basename(binary) == NAME


class ShimZygote:
    """One zygote process, supervised from the event loop's thread: the zygote's
    parent-death signal follows the thread that forked it."""

    def __init__(self, binary: str, socket_path: str, state: Path, debug: bool) -> None:
        self.binary = binary
        self.socket_path = socket_path
        self.state = state
        self.debug = debug
        self._proc: asyncio.subprocess.Process | None = None
        self._supervisor: asyncio.Task | None = None
        self._closing = False
        self._log = log.bind(source="shim-zygote", socket=socket_path)

    def start(self) -> None:
        """Launch in the background: the daemon serves at once, exec'ing shims until
        the zygote listens."""
        if len(self.socket_path) > SUN_PATH_MAX:
            self._log.warning("shim zygote disabled: socket path too long")
            return
        self._supervisor = asyncio.get_running_loop().create_task(self._supervise())

    def serves(self, binary: str) -> bool:
        """Whether a shim of ``binary`` can be asked of the zygote now."""
        return (binary == self.binary and self._proc is not None
                and self._proc.returncode is None)

    async def spawn(self, request: SpawnRequest, timeout: float) -> str:
        """The address of a shim the zygote forked; Unavailable when it does not answer."""
        return await spawn_via_zygote(self.socket_path, request, timeout)

    async def _supervise(self) -> None:
        argv = [self.binary, "zygote", "-socket", self.socket_path, "-state", str(self.state),
                "-parent", str(os.getpid())]
        if self.debug:
            argv.append("-debug")
        for attempt in range(START_ATTEMPTS):
            if self._closing:
                return
            try:
                self._proc = await asyncio.create_subprocess_exec(
                    *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
                    stderr=asyncio.subprocess.PIPE, process_group=0)
            except OSError as exc:
                self._log.warning("shim zygote did not start", error=str(exc))
                return
            self._log.info("shim zygote started", pid=self._proc.pid)
            taken = await self._relay(self._proc)
            code = await self._proc.wait()
            if self._closing:
                return
            if code == 1 and taken and attempt + 1 < START_ATTEMPTS:
                self._log.info("an older shim zygote still listens, retrying")
                await asyncio.sleep(RETRY_DELAY)
                continue
            self._log.warning("shim zygote exited; shims start by exec", code=code)
            return

    async def _relay(self, proc: asyncio.subprocess.Process) -> bool:
        """Copy the zygote's stderr to our log until it closes; True if it said that
        another zygote holds the socket."""
        assert proc.stderr is not None
        taken = False
        async for raw in proc.stderr:
            line = raw.decode(errors="replace").rstrip()
            if not line:
                continue
            taken = taken or "already listens" in line
            self._log.info("shim zygote log", line=line)
        return taken

    async def aclose(self) -> None:
        self._closing = True
        proc = self._proc
        if proc is not None and proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), STOP_TIMEOUT)
            except TimeoutError:
                self._log.warning("shim zygote ignored SIGTERM, killing", pid=proc.pid)
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
        if self._supervisor is not None:
            self._supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._supervisor
