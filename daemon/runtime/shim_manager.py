"""The task manager: one shim per task, started, tracked, deleted and recovered.

The behaviour follows containerd 1.6's runtime/v2 manager: a bundle is written, the
shim binary's ``start`` launches the long-lived shim and prints its address, the
daemon connects over ttrpc and creates the task. When a shim's connection drops
without the daemon having asked for it, the shim binary's ``delete`` cleans up after
it and the task's exit is published. On start-up, bundles left on disk are walked:
live shims are reconnected, dead ones cleaned up.
"""
from __future__ import annotations

import asyncio
import os
import shutil
import stat
import sys
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import structlog
from google.protobuf import any_pb2

from ctrd.api.containerd.events import task_pb2 as ev
from ctrd.api.containerd.types import mount_pb2
from ctrd.errors import AlreadyExists, CtrdError, NotFound, Unavailable
from ctrd.protoutil import timestamp
from ctrd.shim.zygote import SpawnRequest
from ctrd.ttrpc import aio
from ctrd.ttrpc.codec import ClosedError

from ..events.exchange import Exchange
from . import bundle as bundles
from .binary import BINARY_PATH_FILE, ShimCommand, resolve
from .shimlog import ShimLog
from .task import IO, Exit, ShimTask
from .zygote import SOCKET_NAME, ShimZygote, is_zygote_capable

log = structlog.get_logger()

CLEANUP_TIMEOUT = 5.0
SHUTDOWN_TIMEOUT = 3.0
START_TIMEOUT = 30.0
# Status reported for a task whose shim died without telling how the task ended.
UNKNOWN_EXIT = 255


@dataclass(frozen=True)
class CreateOpts:
    spec: bytes
    runtime: str
    io: IO
    rootfs: Sequence[mount_pb2.Mount] = ()
    runtime_options: any_pb2.Any | None = None
    task_options: any_pb2.Any | None = None
    checkpoint: str = ""


@dataclass(frozen=True)
class ManagerConfig:
    root: Path
    state: Path
    address: str
    ttrpc_address: str
    shims: Mapping[str, str]
    load_timeout: float = 5.0
    debug: bool = False


def _wrap(exc: CtrdError, prefix: str) -> CtrdError:
    return type(exc)(f"{prefix}: {exc}")


def remove_socket(address: str) -> None:
    """Remove a dead shim's unix socket file (abstract sockets vanish on their own)."""
    path = address.removeprefix("unix://")
    if not path.startswith("/"):
        return
    try:
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            os.unlink(path)
    except FileNotFoundError:
        pass


def publish_binary() -> str:
    """The executable shims run to publish events (containerd's ``-publish-binary``)."""
    found = shutil.which("ctrd")
    return found or os.path.abspath(sys.argv[0])


class TaskManager:
    def __init__(self, config: ManagerConfig, events: Exchange,
                 runtime_of: Callable[[str, str], Awaitable[str | None]]) -> None:
        """``runtime_of(namespace, id)`` names a container's runtime, for bundles written
        by a daemon too old to have saved the shim path."""
        self.config = config
        self.events = events
        self._runtime_of = runtime_of
        self._tasks: dict[tuple[str, str], ShimTask] = {}
        self._background: set[asyncio.Task] = set()
        self._closing = False
        self._publish_binary = publish_binary()
        self._zygote: ShimZygote | None = None

    # -- lookups -----------------------------------------------------------

    def get(self, namespace: str, id_: str) -> ShimTask:
        task = self._tasks.get((namespace, id_))
        if task is None:
            raise NotFound(f"task {id_} not found")
        return task

    def list(self, namespace: str | None = None) -> list[ShimTask]:
        return [t for (ns, _), t in sorted(self._tasks.items())
                if namespace is None or ns == namespace]

    # -- the shim zygote --------------------------------------------------

    def start_zygote(self) -> None:
        """Run our shim's zygote if a configured runtime is served by our shim."""
        search = (os.path.dirname(self._publish_binary),)
        for runtime in self.config.shims:
            try:
                binary = resolve(runtime, self.config.shims, search)
            except CtrdError:
                continue
            if is_zygote_capable(binary):
                self._zygote = ShimZygote(binary, str(self.config.state / SOCKET_NAME),
                                          self.config.state, self.config.debug)
                self._zygote.start()
                return

    # -- create / delete ---------------------------------------------------

    def _command(self, binary: str) -> ShimCommand:
        return ShimCommand(binary, self.config.address, self.config.ttrpc_address,
                           self._publish_binary, self.config.debug)

    async def create(self, namespace: str, id_: str, opts: CreateOpts) -> tuple[ShimTask, int]:
        key = (namespace, id_)
        if key in self._tasks:
            raise AlreadyExists(f"task {id_}: already exists")
        root = self.config.root
        bundle = await asyncio.to_thread(bundles.create, self.config.state, root, namespace,
                                         id_, opts.spec)
        topts = opts.task_options if opts.task_options is not None else opts.runtime_options
        try:
            task = await self._start_shim(bundle, opts.runtime, topts)
        except CtrdError as exc:
            await asyncio.to_thread(bundle.delete)
            raise _wrap(exc, "failed to start shim") from None
        except BaseException:
            await asyncio.to_thread(bundle.delete)
            raise
        self._tasks[key] = task
        try:
            pid = await task.create(opts.io, opts.rootfs, topts, opts.checkpoint)
        except BaseException as exc:
            self._tasks.pop(key, None)
            await self._dispose(task, delete_first=True)
            if isinstance(exc, CtrdError):
                raise _wrap(exc, "failed to create shim task") from None
            raise
        return task, pid

    async def _start_shim(self, bundle: bundles.Bundle, runtime: str,
                          options: any_pb2.Any | None) -> ShimTask:
        binary = resolve(runtime, self.config.shims, (os.path.dirname(self._publish_binary),))
        command = self._command(binary)
        shim_log = ShimLog(bundle)
        try:
            address = await self._launch(command, bundle, options)
            task = await self._connect(bundle, address, command, shim_log)
        except BaseException:
            shim_log.close()
            raise
        log.info("shim started", id=bundle.id, namespace=bundle.namespace, binary=binary,
                 address=address)
        return task

    async def _launch(self, command: ShimCommand, bundle: bundles.Bundle,
                      options: any_pb2.Any | None) -> str:
        """Start the shim, forked by the zygote when it serves this binary, else by
        exec'ing the binary's ``start``; returns the shim's address."""
        zygote = self._zygote
        if zygote is not None and zygote.serves(command.binary):
            request = SpawnRequest(
                bundle.namespace, bundle.id, str(bundle.path), self.config.address,
                self.config.ttrpc_address, self.config.debug, env=command.env(bundle),
                options=options.SerializeToString() if options is not None else b"")
            try:
                address = await zygote.spawn(request, START_TIMEOUT)
            except Unavailable as exc:
                log.info("shim zygote unavailable, exec'ing start", id=bundle.id,
                         namespace=bundle.namespace, error=str(exc))
            else:
                command.record(bundle)
                return address
        return await command.start(bundle, options, START_TIMEOUT)

    async def _connect(self, bundle: bundles.Bundle, address: str, command: ShimCommand,
                       shim_log: ShimLog) -> ShimTask:
        task: ShimTask | None = None

        def closed() -> None:
            # The connection can only drop once the task exists; the guard is for form.
            if task is not None:
                self._on_close(task)

        client = await aio.Client.connect(address, timeout=self.config.load_timeout,
                                          on_close=closed)
        task = ShimTask(bundle, client, command, shim_log)
        return task

    async def _dispose(self, task: ShimTask, delete_first: bool) -> None:
        """Tear down a shim the daemon is done with: delete, shut down, remove the bundle."""
        task.deleting = True
        if delete_first:
            try:
                await task.delete_process("")
            except CtrdError as exc:
                log.debug("shim delete after failed create", id=task.id, error=str(exc))
        try:
            await task.shutdown(SHUTDOWN_TIMEOUT)
        except CtrdError as exc:
            log.warning("shim shutdown failed", id=task.id, error=str(exc))
        await task.close()
        try:
            hidden = await asyncio.to_thread(task.bundle.detach)
        except OSError as exc:
            log.error("bundle delete failed", id=task.id, error=str(exc))
            return
        # The id is free again; removing the files need not hold up the caller.
        self._spawn(asyncio.to_thread(bundles.remove_trees, hidden))

    async def delete(self, namespace: str, id_: str) -> Exit:
        task = self.get(namespace, id_)
        try:
            exit_ = await task.delete_process("")
        except ClosedError:
            # The shim died under us; the close handler reports the exit and cleans up.
            raise
        except NotFound:
            exit_ = None
        self._tasks.pop((namespace, id_), None)
        await self._dispose(task, delete_first=False)
        if exit_ is None:
            raise NotFound(f"task {id_} not found")
        return exit_

    # -- dead shims --------------------------------------------------------

    def _on_close(self, task: ShimTask) -> None:
        if self._closing or task.deleting:
            return
        log.info("shim disconnected", id=task.id, namespace=task.namespace)
        self._spawn(self._cleanup_dead(task, publish=None))

    def _spawn(self, coro: Awaitable) -> None:
        job = asyncio.get_running_loop().create_task(coro)  # type: ignore[arg-type]
        self._background.add(job)
        job.add_done_callback(self._background.discard)

    async def _cleanup_dead(self, task: ShimTask, publish: bool | None) -> None:
        """Run the shim binary's ``delete`` and report the task's end.

        ``publish`` None means: publish if the task was still tracked (it was not deleted
        through the API meanwhile)."""
        ns, id_ = task.namespace, task.id
        bound = log.bind(id=id_, namespace=ns)
        bound.warning("cleaning up after shim disconnected")
        task.deleting = True
        response = None
        address = (task.bundle.read("address") or "").strip()
        try:
            response = await task.command.delete(task.bundle, CLEANUP_TIMEOUT)
            await asyncio.to_thread(task.bundle.delete)
            # A killed shim could not remove its socket; nothing else will.
            await asyncio.to_thread(remove_socket, address)
        except (CtrdError, OSError) as exc:
            bound.warning("failed to clean up after shim disconnected", error=str(exc))
        if task.shim_log is not None:
            task.shim_log.close()
        tracked = self._tasks.get((ns, id_)) is task
        if tracked:
            del self._tasks[(ns, id_)]
        if not (tracked if publish is None else publish):
            return
        if response is not None:
            pid, status = response.pid, response.exit_status
            exited_at = response.exited_at.ToNanoseconds() or time.time_ns()
        else:
            pid, status, exited_at = 0, UNKNOWN_EXIT, time.time_ns()
        await self.events.publish(ns, "/tasks/exit", ev.TaskExit(
            container_id=id_, id=id_, pid=pid, exit_status=status,
            exited_at=timestamp(exited_at)))
        await self.events.publish(ns, "/tasks/delete", ev.TaskDelete(
            container_id=id_, pid=pid, exit_status=status, exited_at=timestamp(exited_at)))

    # -- recovery ----------------------------------------------------------

    async def load_existing(self) -> None:
        found = await asyncio.to_thread(bundles.load_all, self.config.state)
        for bundle in found:
            await self._load(bundle)
        live = {(b.namespace, b.id) for b in found}
        await asyncio.to_thread(bundles.remove_orphan_work_dirs, self.config.root, live)

    async def _load(self, bundle: bundles.Bundle) -> None:
        bound = log.bind(id=bundle.id, namespace=bundle.namespace)
        if not any(bundle.path.iterdir()):
            await asyncio.to_thread(bundle.delete)
            return
        binary = bundle.read(BINARY_PATH_FILE)
        if not binary:
            runtime = await self._runtime_of(bundle.namespace, bundle.id)
            if runtime is None:
                bound.warning("bundle without container, removing")
                await asyncio.to_thread(bundle.delete)
                return
            try:
                binary = resolve(runtime, self.config.shims,
                                 (os.path.dirname(self._publish_binary),))
            except CtrdError as exc:
                bound.error("failed to resolve runtime path", error=str(exc))
                await asyncio.to_thread(bundle.delete)
                return
        command = self._command(binary)
        address = (bundle.read("address") or "").strip()
        shim_log = ShimLog(bundle)
        task: ShimTask | None = None
        try:
            if not address:
                raise NotFound("no shim address")
            task = await self._connect(bundle, address, command, shim_log)
            await task.connect(timeout=self.config.load_timeout)
        except (CtrdError, OSError, TimeoutError) as exc:
            bound.warning("shim of bundle is gone", error=str(exc))
            if task is None:
                task = ShimTask(bundle, None, command, shim_log)
            task.deleting = True
            await task.close()
            # Off the start-up path: the daemon serves while dead shims are cleaned up.
            self._spawn(self._cleanup_dead(task, publish=True))
            return
        self._tasks[(bundle.namespace, bundle.id)] = task
        bound.info("shim reconnected", address=address)

    async def aclose(self) -> None:
        """Daemon shutdown: let go of the shims, which keep their tasks running."""
        self._closing = True
        if self._zygote is not None:
            await self._zygote.aclose()
        for job in list(self._background):
            try:
                await asyncio.wait_for(asyncio.shield(job), CLEANUP_TIMEOUT + 1)
            except (TimeoutError, asyncio.CancelledError, Exception):  # noqa: BLE001
                pass
        for task in list(self._tasks.values()):
            await task.close()
        self._tasks.clear()
