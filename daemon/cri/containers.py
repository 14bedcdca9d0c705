"""Containers of a pod: created from an image into the pod's namespaces, run, stopped.

As in containerd 1.6, CreateContainer writes the containerd container (spec,
snapshot) and StartContainer creates and starts its task, with stdout and stderr
going through FIFOs into the CRI log file. The end of the main process comes back
as a ``/tasks/exit`` event (or from the Wait a stop makes); the exit is recorded
and the task deleted, which frees the shim.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import shutil
import signal
import time
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import structlog
from google.protobuf import any_pb2

from ctrd.errors import CtrdError, DeadlineExceeded, FailedPrecondition, InvalidArgument, NotFound
from ctrd.oci import spec as oci

from ..metadata.containers import OCI_SPEC_TYPE, AnyValue
from ..metadata.containers import Container as Record
from ..runtime.shim_manager import CreateOpts, TaskManager
from ..runtime.task import IO, Exit
from ..snapshots.mounts import temp_mount
from . import specs, stats
from .cleanup import delete_task, remove_snapshot
from .config import NAMESPACE, CRIConfig
from .events import EventFeed, EventKind
from .execio import ExecCapture
from .fifos import ContainerFifos, create_fifos, open_reader, remove_fifos
from .images import CRIImages
from .logs import LogCopier
from .mounts import to_proto
from .records import (
    Container,
    ContainerConfig,
    ContainerState,
    ContainerStatus,
    Resources,
    Sandbox,
    SandboxState,
)
from .stats import Usage
from .store import CRIStore
from .streaming.streams import CommandStreams

log = structlog.get_logger()

# A stopped container's task reports this when nobody knows how it ended.
UNKNOWN_EXIT = 255
EXEC_OUTPUT_LIMIT = 16 * 1024 * 1024
# How long output may keep coming after the main process ended (from its children).
LOG_DRAIN_TIMEOUT = 10.0
# The type URL containerd's clients give an exec's JSON process spec.
PROCESS_TYPE = "types.containerd.io/opencontainers/runtime-spec/1/Process"
RESOURCES_TYPE = "types.containerd.io/opencontainers/runtime-spec/1/LinuxResources"


def container_name(config: ContainerConfig, pod: Sandbox) -> str:
    meta = pod.config
    return f"k8s_{config.name}_{meta.name}_{meta.namespace}_{meta.uid}_{config.attempt}"


class ContainerManager:
    def __init__(self, config: CRIConfig, store: CRIStore, images: CRIImages, snapshots: Any,
                 tasks: TaskManager, sandbox_files: Any, feed: EventFeed) -> None:
        self.config = config
        self.store = store
        self.images = images
        self.snapshots = snapshots
        self.tasks = tasks
        self.sandbox_files = sandbox_files  # id -> folder of the pod's shared files
        self.feed = feed
        self._logs: dict[str, LogCopier] = {}
        self._stdio: dict[str, ContainerFifos] = {}  # running containers' FIFOs, for attach
        self._finishing: set[asyncio.Task[None]] = set()

    def fifo_dir(self, id_: str) -> Path:
        return self.config.state / "io" / id_

    # -- create ---------------------------------------------------------------------------

    async def create(self, sandbox_id: str, config: ContainerConfig) -> str:
        if not config.name:
            raise InvalidArgument("container config must include metadata name")
        if not config.image:
            raise InvalidArgument("container config must include an image")
        sandbox = self.store.sandbox(sandbox_id)
        if sandbox.state != SandboxState.READY:
            raise FailedPrecondition(f"sandbox {sandbox.id} is not ready")
        image = await self.images.get(config.image)
        id_ = secrets.token_hex(32)
        name = container_name(config, sandbox)
        self.store.reserve(name, id_)
        log_path = ""
        if sandbox.config.log_directory and config.log_path:
            log_path = os.path.normpath(os.path.join(sandbox.config.log_directory,
                                                     config.log_path))
            if not log_path.startswith(sandbox.config.log_directory.rstrip("/") + "/"):
                self.store.release(name)
                raise InvalidArgument(f"log path {config.log_path!r} leaves the pod's "
                                      "log directory")
        container = Container(id=id_, name=name, sandbox_id=sandbox.id, config=config,
                              image_id=image.id, image_ref=config.image, log_path=log_path,
                              status=ContainerStatus(created_at=time.time_ns()))
        async with AsyncExitStack() as undo:
            undo.callback(self.store.release, name)
            mounts = await self.snapshots.prepare(NAMESPACE, self.config.snapshotter, id_,
                                                  image.chain_id, {})
            undo.push_async_callback(remove_snapshot, self.snapshots,
                                     self.config.snapshotter, id_)
            files = self.sandbox_files(sandbox.id)
            spec = await asyncio.to_thread(self._spec, id_, config, sandbox, image.config,
                                           config.image, mounts, files)
            record = Record(id=id_, runtime_name=self.config.runtime,
                            spec=AnyValue(OCI_SPEC_TYPE, oci.dumps(spec)),
                            image=config.image, snapshotter=self.config.snapshotter,
                            snapshot_key=id_, labels=dict(config.labels))
            await self.store.add_container(container, record)
            undo.pop_all()
        self.feed.publish(id_, sandbox.id, EventKind.CREATED)
        log.info("container created", container=id_, sandbox=sandbox.id, name=config.name)
        return id_

    def _spec(self, id_: str, config: ContainerConfig, sandbox: Sandbox,
              image_config: dict[str, Any], image_name: str, mounts: list,
              files: Path) -> dict[str, Any]:
        # The image's /etc/passwd and /etc/group name its users: mount it to read them.
        with temp_mount(mounts, str(self.config.state / "tmpmounts"), readonly=True) as root:
            return specs.container_spec(id_, config, sandbox, image_config, image_name,
                                        Path(root), files, NAMESPACE, self.config.oom_floor())

    # -- start ----------------------------------------------------------------------------

    async def start(self, id_: str) -> None:
        container = self.store.container(id_)
        async with self.store.lock(container.id):
            if container.status.state != ContainerState.CREATED:
                raise FailedPrecondition(f"container {container.id} is in "
                                         f"{container.status.state.name} state, not CREATED")
            sandbox = self.store.sandbox(container.sandbox_id)
            if sandbox.state != SandboxState.READY:
                raise FailedPrecondition(f"sandbox {sandbox.id} is not ready")
            record = await self.store.records.get(NAMESPACE, container.id)
            assert record.spec is not None  # written by create()
            mounts = await self.snapshots.mounts(NAMESPACE, self.config.snapshotter, id_)
            config = container.config
            fifos = await create_fifos(self.fifo_dir(container.id), container.id,
                                       stdin=config.stdin, tty=config.tty)
            copier = LogCopier(container.id, fifos, container.log_path,
                               max_line_size=self.config.max_log_line)
            try:
                await copier.start()
                opts = CreateOpts(spec=record.spec.value, runtime=record.runtime_name,
                                  io=IO(fifos.stdin, fifos.stdout, fifos.stderr, config.tty),
                                  rootfs=to_proto(mounts))
                task, pid = await self.tasks.create(NAMESPACE, container.id, opts)
                # Taken before Start: a quick process may have exited by the time it returns.
                started_at = time.time_ns()
                try:
                    await task.start()
                except BaseException:
                    await delete_task(self.tasks, container.id)
                    raise
            except BaseException as exc:
                await copier.close()
                await remove_fifos(fifos)
                container.status.state = ContainerState.EXITED
                container.status.finished_at = time.time_ns()
                container.status.exit_code = UNKNOWN_EXIT
                container.status.reason = "StartError"
                container.status.message = str(exc)
                await self.store.save(container)
                raise
            self._logs[container.id] = copier
            self._stdio[container.id] = fifos
            container.status.state = ContainerState.RUNNING
            container.status.pid = pid
            container.status.started_at = started_at
            await self.store.save(container)
        self.feed.publish(container.id, container.sandbox_id, EventKind.STARTED)
        log.info("container started", container=container.id, pid=pid)

    # -- exits ----------------------------------------------------------------------------

    async def on_exit(self, id_: str, exit_: Exit) -> None:
        container = self.store.containers.get(id_)
        if container is None:
            return
        async with self.store.lock(id_):
            await self._record_exit(container, exit_)

    async def _record_exit(self, container: Container, exit_: Exit) -> None:
        """Note the exit once, delete the task (freeing its shim), finish the log."""
        if container.status.state != ContainerState.RUNNING:
            return
        status = container.status
        status.state = ContainerState.EXITED
        status.exit_code = exit_.status
        status.finished_at = exit_.exited_at or time.time_ns()
        status.reason = status.reason or ("Completed" if exit_.status == 0 else "Error")
        await self.store.save(container)
        await delete_task(self.tasks, container.id)
        self._stdio.pop(container.id, None)
        copier = self._logs.pop(container.id, None)
        if copier is not None:
            # A process the container left behind may hold its stdout: never wait for
            # the log under the container's lock.
            task = asyncio.create_task(self._finish_log(container.id, copier))
            self._finishing.add(task)
            task.add_done_callback(self._finishing.discard)
        self.feed.publish(container.id, container.sandbox_id, EventKind.STOPPED)
        log.info("container exited", container=container.id, exit_code=exit_.status)

    async def _finish_log(self, id_: str, copier: LogCopier) -> None:
        try:
            await asyncio.wait_for(copier.wait(), LOG_DRAIN_TIMEOUT)
        except TimeoutError:
            log.warning("container output still open after exit; log closed", container=id_)
            await copier.close()
        await self._remove_fifos(id_)

    async def on_oom(self, id_: str) -> None:
        container = self.store.containers.get(id_)
        if container is not None and container.status.state == ContainerState.RUNNING:
            # containerd reports an OOM-killed container's reason as OOMKilled.
            container.status.reason = "OOMKilled"

    # -- stop and remove ------------------------------------------------------------------

    async def stop(self, id_: str, timeout: float) -> None:
        container = self.store.container(id_)
        async with self.store.lock(container.id):
            await self._stop(container, timeout)

    async def _stop(self, container: Container, timeout: float) -> None:
        if container.status.state != ContainerState.RUNNING:
            return
        try:
            task = self.tasks.get(NAMESPACE, container.id)
        except NotFound:
            await self._record_exit(container, Exit(0, UNKNOWN_EXIT, time.time_ns()))
            return
        waiter = asyncio.create_task(task.wait())
        try:
            if timeout > 0:
                await self._signal(task, signal.SIGTERM)
                try:
                    await asyncio.wait_for(asyncio.shield(waiter), timeout)
                except TimeoutError:
                    log.info("container ignored SIGTERM; killing", container=container.id)
            if not waiter.done():
                await self._signal(task, signal.SIGKILL)
            exit_ = await asyncio.wait_for(waiter, 30)
        except (TimeoutError, CtrdError) as exc:
            waiter.cancel()
            raise FailedPrecondition(f"container {container.id} did not stop: "
                                     f"{str(exc) or type(exc).__name__}") from None
        await self._record_exit(container, exit_)

    async def _signal(self, task: Any, signum: int) -> None:
        try:
            await task.kill(signum, all_=False)
        except (NotFound, FailedPrecondition):
            pass  # it ended meanwhile

    async def stop_all(self, sandbox_id: str) -> None:
        for container in self.store.containers_of(sandbox_id):
            async with self.store.lock(container.id):
                await self._stop(container, 0)

    async def remove(self, id_: str) -> None:
        try:
            container = self.store.container(id_)
        except NotFound:
            return  # removing twice is fine, as CRI asks
        async with self.store.lock(container.id):
            await self._stop(container, 0)
            await delete_task(self.tasks, container.id)
            await remove_snapshot(self.snapshots, self.config.snapshotter, container.id)
            await self._remove_fifos(container.id)
            await self.store.remove(container)
        self.feed.publish(container.id, container.sandbox_id, EventKind.DELETED)
        log.info("container removed", container=container.id)

    async def remove_all(self, sandbox_id: str) -> None:
        for container in self.store.containers_of(sandbox_id):
            await self.remove(container.id)

    async def reopen_log(self, id_: str) -> None:
        container = self.store.container(id_)
        copier = self._logs.get(container.id)
        if container.status.state != ContainerState.RUNNING or copier is None:
            raise FailedPrecondition(f"container {container.id} is not running")
        await copier.reopen()

    # -- resources ------------------------------------------------------------------------

    async def update_resources(self, id_: str, resources: Resources) -> None:
        """New CPU/memory limits: in the stored spec, and on the live task if running."""
        container = self.store.container(id_)
        async with self.store.lock(container.id):
            record = await self.store.records.get(NAMESPACE, container.id)
            assert record.spec is not None
            spec = json.loads(record.spec.value)
            specs.with_resources(spec, resources, self.config.oom_floor())
            if container.status.state == ContainerState.RUNNING:
                task = self.tasks.get(NAMESPACE, container.id)
                value = json.dumps(spec["linux"]["resources"]).encode()
                await task.update(any_pb2.Any(type_url=RESOURCES_TYPE, value=value), {})
            record.spec = AnyValue(record.spec.type_url, oci.dumps(spec))
            await self.store.records.update(NAMESPACE, record, ["spec"])
            container.config.resources = resources
            await self.store.save(container)
        log.info("container resources updated", container=container.id)

    async def stats(self, id_: str) -> Usage | None:
        """CPU and memory use of a running container; None for one that is not running."""
        container = self.store.container(id_)
        if container.status.state != ContainerState.RUNNING:
            return None
        try:
            return stats.from_metrics(await self.tasks.get(NAMESPACE, container.id).stats())
        except NotFound:
            return None

    # -- exec -----------------------------------------------------------------------------

    async def _exec_target(self, id_: str, cmd: list[str],
                           tty: bool) -> tuple[Container, Any, dict[str, Any]]:
        """The running container, its task and the process spec of ``cmd`` in it."""
        container = self.store.container(id_)
        if container.status.state != ContainerState.RUNNING:
            raise FailedPrecondition(f"container {container.id} is not running")
        record = await self.store.records.get(NAMESPACE, container.id)
        assert record.spec is not None
        process = specs.exec_process(json.loads(record.spec.value)["process"], cmd)
        process["terminal"] = tty
        return container, self.tasks.get(NAMESPACE, container.id), process

    async def exec_sync(self, id_: str, cmd: list[str], timeout: float) -> tuple[bytes, bytes, int]:
        """Run ``cmd`` in the container; its stdout, stderr and exit code.

        ``timeout`` (seconds, 0 for none) bounds the command; past it the command is
        killed and DeadlineExceeded raised, as kubelet's probes expect."""
        container, task, process = await self._exec_target(id_, cmd, tty=False)
        exec_id = secrets.token_hex(16)
        fifos = await create_fifos(self.fifo_dir(container.id), exec_id, stdin=False, tty=False)
        output = ExecCapture(fifos, EXEC_OUTPUT_LIMIT)
        try:
            await output.start()
            spec = any_pb2.Any(type_url=PROCESS_TYPE, value=oci.dumps(process))
            await task.exec(exec_id, IO("", fifos.stdout, fifos.stderr, False), spec)
            try:
                await task.start(exec_id)
                try:
                    exit_ = await asyncio.wait_for(task.wait(exec_id), timeout or None)
                except TimeoutError:
                    await self._signal_exec(task, exec_id)
                    raise DeadlineExceeded(f"command {cmd!r} did not finish in {timeout}s") \
                        from None
                try:
                    # A child of the command may keep the pipes open: take what came.
                    result = await asyncio.wait_for(output.wait(), LOG_DRAIN_TIMEOUT)
                except TimeoutError:
                    result = output.output()
            finally:
                try:
                    await task.delete_process(exec_id)
                except CtrdError:
                    pass
        finally:
            await output.close()
            await remove_fifos(fifos)
        return result.stdout, result.stderr, exit_.status

    async def exec_stream(self, id_: str, cmd: list[str], streams: CommandStreams) -> None:
        """Run ``cmd`` in the container wired to a streaming client (kubectl exec): its
        stdin, output, terminal size, and at the end its exit status. A client that goes
        away takes the command with it."""
        options = streams.options
        try:
            container, task, process = await self._exec_target(id_, cmd, tty=options.tty)
        except CtrdError as exc:
            await streams.finish(None, str(exc))
            return
        exec_id = secrets.token_hex(16)
        fifos = await create_fifos(self.fifo_dir(container.id), exec_id,
                                   stdin=options.stdin, tty=options.tty)
        outputs: list[asyncio.Task[None]] = []
        pumps: list[asyncio.Task[None]] = []
        exit_code: int | None = None
        error = ""
        try:
            outputs.append(asyncio.create_task(_copy_out(fifos.stdout, streams.write_stdout)))
            if fifos.stderr:
                outputs.append(asyncio.create_task(_copy_out(fifos.stderr,
                                                             streams.write_stderr)))
            spec = any_pb2.Any(type_url=PROCESS_TYPE, value=oci.dumps(process))
            await task.exec(exec_id, IO(fifos.stdin, fifos.stdout, fifos.stderr, options.tty),
                            spec)
            try:
                waiter = asyncio.create_task(task.wait(exec_id))
                await task.start(exec_id)
                if fifos.stdin and streams.stdin is not None:
                    pumps.append(asyncio.create_task(
                        _copy_in(streams.stdin, fifos.stdin, task, exec_id)))
                if options.tty:
                    pumps.append(asyncio.create_task(
                        _resize(streams.resizes, task, exec_id)))
                gone = asyncio.create_task(streams.disconnected.wait())
                await asyncio.wait({waiter, gone}, return_when=asyncio.FIRST_COMPLETED)
                if not waiter.done():
                    log.info("exec client went away; killing the command",
                             container=container.id, exec_id=exec_id)
                    await self._signal_exec(task, exec_id)
                gone.cancel()
                exit_code = (await waiter).status
                # Output may still be in the pipes: let it reach the client first.
                await asyncio.wait(outputs, timeout=LOG_DRAIN_TIMEOUT)
            finally:
                with contextlib.suppress(CtrdError):
                    await task.delete_process(exec_id)
        except CtrdError as exc:
            error = str(exc)
        finally:
            for pump in outputs + pumps:
                pump.cancel()
            await asyncio.gather(*outputs, *pumps, return_exceptions=True)
            await remove_fifos(fifos)
        await streams.finish(exit_code, error)

    async def attach_stream(self, id_: str, streams: CommandStreams) -> None:
        """Join a client to the running container's own stdio (kubectl attach): its
        output from now on, its stdin, its terminal size, until it exits or the client
        leaves. With stdin_once, the client closing stdin closes the container's."""
        options = streams.options
        container = self.store.containers.get(id_)
        copier = self._logs.get(id_)
        fifos = self._stdio.get(id_)
        if container is None or copier is None or fifos is None:
            await streams.finish(None, f"container {id_} is not running")
            return
        task = self.tasks.get(NAMESPACE, container.id)
        chunks: asyncio.Queue[tuple[bytes, bytes]] = asyncio.Queue()
        stop_listening = copier.listen(lambda stream, chunk: chunks.put_nowait((stream, chunk)))
        pumps: list[asyncio.Task[None]] = []
        try:
            if options.stdin and streams.stdin is not None and fifos.stdin:
                close_after = container.config.stdin_once
                pumps.append(asyncio.create_task(
                    _copy_in(streams.stdin, fifos.stdin, task, "", close=close_after)))
            if options.tty:
                pumps.append(asyncio.create_task(_resize(streams.resizes, task, "")))
            relay = asyncio.create_task(_relay(chunks, len(fifos.paths()) - bool(fifos.stdin),
                                               streams))
            gone = asyncio.create_task(streams.disconnected.wait())
            await asyncio.wait({relay, gone}, return_when=asyncio.FIRST_COMPLETED)
            for waiter in (relay, gone):
                waiter.cancel()
        finally:
            stop_listening()
            for pump in pumps:
                pump.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)
        await streams.finish(0)

    async def _signal_exec(self, task: Any, exec_id: str) -> None:
        try:
            await task.kill(signal.SIGKILL, exec_id=exec_id)
            await asyncio.wait_for(task.wait(exec_id), 10)
        except (CtrdError, TimeoutError):
            pass

    # -- helpers --------------------------------------------------------------------------



    async def _remove_fifos(self, id_: str) -> None:
        folder = self.fifo_dir(id_)
        await asyncio.to_thread(_rmtree, folder)

    async def recover(self) -> None:
        """After a restart: reattach logs of running containers, note the ones that ended."""
        for container in list(self.store.containers.values()):
            if container.status.state != ContainerState.RUNNING:
                continue
            try:
                task = self.tasks.get(NAMESPACE, container.id)
                state = await task.state()
            except CtrdError:
                await self.on_exit(container.id, Exit(0, UNKNOWN_EXIT, time.time_ns()))
                continue
            if state.status == 3:  # STOPPED while the daemon was away
                await self.on_exit(container.id, Exit(state.pid, state.exit_status,
                                                      state.exited_at.ToNanoseconds()))
                continue
            fifos = ContainerFifos(state.stdin, state.stdout, state.stderr)
            copier = LogCopier(container.id, fifos, container.log_path,
                               max_line_size=self.config.max_log_line)
            try:
                await copier.start()
                self._logs[container.id] = copier
                self._stdio[container.id] = fifos
            except (CtrdError, OSError) as exc:
                log.warning("container log not reattached", container=container.id,
                            error=str(exc))

    def list(self) -> list[Container]:
        return sorted(self.store.containers.values(), key=lambda c: c.status.created_at)


async def _copy_out(path: str, send: Any) -> None:
    reader, transport = await open_reader(path)
    try:
        while chunk := await reader.read(64 * 1024):
            await send(chunk)
    finally:
        transport.close()


async def _relay(chunks: asyncio.Queue[tuple[bytes, bytes]], outputs: int,
                 streams: CommandStreams) -> None:
    """Attached output to the client until every output stream of the container ended."""
    while outputs:
        stream, chunk = await chunks.get()
        if not chunk:
            outputs -= 1
        elif stream == b"stdout" and streams.options.stdout:
            await streams.write_stdout(chunk)
        elif stream == b"stderr" and streams.options.stderr:
            await streams.write_stderr(chunk)


async def _copy_in(source: asyncio.StreamReader, path: str, task: Any, exec_id: str, *,
                   close: bool = True) -> None:
    """The client's stdin into the exec's stdin FIFO; at its end the shim is told to
    close the process's stdin (the shim keeps the FIFO open for itself otherwise)."""
    loop = asyncio.get_running_loop()
    # Write-only: asyncio takes a pipe end that turns readable for one its peer closed,
    # and would drop what it still had to write. The shim has had its reader open
    # since the exec was created, so the open cannot fail for want of one.
    fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
    pipe = os.fdopen(fd, "wb", buffering=0)
    transport, protocol = await loop.connect_write_pipe(asyncio.streams.FlowControlMixin, pipe)
    writer = asyncio.StreamWriter(transport, protocol, None, loop)
    try:
        while chunk := await source.read(64 * 1024):
            writer.write(chunk)
            await writer.drain()
    finally:
        writer.close()
    if close:
        with contextlib.suppress(CtrdError):
            await task.close_io(exec_id)


async def _resize(sizes: asyncio.Queue[tuple[int, int]], task: Any, exec_id: str) -> None:
    while True:
        width, height = await sizes.get()
        with contextlib.suppress(CtrdError):
            await task.resize_pty(exec_id, width, height)


def _rmtree(folder: Path) -> None:
    shutil.rmtree(folder, ignore_errors=True)
