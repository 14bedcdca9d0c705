"""The daemon process: lock the root, start the plugins, serve gRPC until told to stop."""
from __future__ import annotations

import asyncio
import fcntl
import os
import signal
from pathlib import Path
from typing import TYPE_CHECKING

import structlog

from ctrd.errors import FailedPrecondition

from . import rpc
from .config import Config
from .plugin import EVENT, GRPC, Registry
from .plugins import PLUGINS
from .services.interceptor import ErrorInterceptor

if TYPE_CHECKING:
    from .metrics import Metrics

log = structlog.get_logger()


class RootLock:
    """An exclusive flock on ``<root>/ctrd.lock``: one daemon per root."""

    def __init__(self, root: Path) -> None:
        self.path = root / "ctrd.lock"
        self._fd: int | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o711)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise FailedPrecondition(
                f"root {self.path.parent} is in use by another ctrd (lock {self.path})") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class Daemon:
    def __init__(self, config: Config, plugins=PLUGINS) -> None:
        self.config = config
        self.registry = Registry(list(plugins), config)
        self.metrics: Metrics | None = None
        self.lock = RootLock(Path(config.root))
        self.server: rpc.Server | None = None
        self._stop = asyncio.Event()

    async def start(self) -> None:
        self.lock.acquire()
        Path(self.config.state).mkdir(parents=True, exist_ok=True, mode=0o711)
        await self.registry.start()
        self.server = rpc.Server(
            max_receive_message_length=self.config.max_recv_message_size,
            max_send_message_length=self.config.max_send_message_size)
        if self.config.metrics_address:
            # Only then: prometheus_client costs a megabyte and every call pays to count.
            from .metrics import Metrics
            self.metrics = Metrics()
        registrar = ErrorInterceptor(self.metrics).registrar(self.server)
        for service in self.registry.get_all(GRPC).values():
            service.register(registrar)
        self._bind()
        await self.server.start()
        self._secure_socket()
        if self.metrics is not None:
            self.metrics.serve(self.config.metrics_address)
        log.info("ctrd serving", address=self.config.address, root=self.config.root,
                 pid=os.getpid())

    def _bind(self) -> None:
        sock = Path(self.config.address)
        sock.parent.mkdir(parents=True, exist_ok=True, mode=0o711)
        # The root lock proves no other daemon owns this socket, so a leftover is stale.
        if sock.is_socket():
            sock.unlink()
        # Create the socket without group/other write bits from the start; fixing the
        # mode after the fact would leave a window where anyone could connect.
        old = os.umask(0o117)
        try:
            self.server.add_insecure_port(f"unix://{sock}")
        finally:
            os.umask(old)

    def _secure_socket(self) -> None:
        os.chown(self.config.address, self.config.uid, self.config.gid)
        os.chmod(self.config.address, 0o660)

    def request_stop(self) -> None:
        self._stop.set()

    async def serve(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)
        await self.start()
        try:
            await self._stop.wait()
        finally:
            await self.stop()

    async def stop(self) -> None:
        log.info("ctrd stopping")
        # Endless event streams would hold the drain open; end them first.
        exchange = self.registry.get_all(EVENT).get("exchange")
        if exchange is not None:
            exchange.close()
        if self.server is not None:
            await self.server.stop(grace=self.config.shutdown_timeout)
        if self.metrics is not None:
            self.metrics.close()
        await self.registry.close()
        try:
            os.unlink(self.config.address)
        except FileNotFoundError:
            pass
        self.lock.release()
        log.info("ctrd stopped")
