"""The CRI runtime: pods and containers together, kept up to date by task events.

One object for the gRPC layer to call. It listens to the event exchange for the
``/tasks/exit`` and ``/tasks/oom`` of the ``k8s.io`` namespace (published by every
shim) so that a container that ends on its own is seen as EXITED, and a pod whose
pause process died as NOT_READY, without anyone polling.
"""
from __future__ import annotations

import asyncio
import contextlib

import structlog

from ctrd.api.containerd.events import task_pb2 as ev
from ctrd.errors import CtrdError, NotFound
from ctrd.protoutil import unpack

from ..events.exchange import Exchange
from ..runtime.task import Exit
from . import stats
from .config import NAMESPACE
from .containers import ContainerManager
from .events import EventFeed
from .records import Container, ContainerConfig, Sandbox, SandboxConfig, SandboxState
from .sandboxes import SandboxManager
from .stats import PodUsage

log = structlog.get_logger()

_FILTERS = [f'namespace=="{NAMESPACE}",topic=="/tasks/exit"',
            f'namespace=="{NAMESPACE}",topic=="/tasks/oom"']


class CRIRuntime:
    def __init__(self, sandboxes: SandboxManager, containers: ContainerManager,
                 events: Exchange, feed: EventFeed) -> None:
        self.sandboxes = sandboxes
        self.containers = containers
        self.events = events
        self.feed = feed
        self._monitor: asyncio.Task[None] | None = None

    async def start(self) -> None:
        stream = await self.events.subscribe(_FILTERS)
        self._monitor = asyncio.create_task(self._watch(stream))
        await self.sandboxes.store.load()
        await self.sandboxes.recover()
        await self.containers.recover()

    async def aclose(self) -> None:
        if self._monitor is not None:
            self._monitor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._monitor

    async def _watch(self, stream) -> None:
        async for envelope in stream:
            try:
                event = unpack(envelope.event)
                if isinstance(event, ev.TaskExit):
                    # An exec's end is the exec's business; only main processes count.
                    if event.id and event.id != event.container_id:
                        continue
                    exit_ = Exit(event.pid, event.exit_status, event.exited_at.ToNanoseconds())
                    if event.container_id in self.sandboxes.store.sandboxes:
                        await self.sandboxes.on_exit(event.container_id)
                    else:
                        await self.containers.on_exit(event.container_id, exit_)
                elif isinstance(event, ev.TaskOOM):
                    await self.containers.on_oom(event.container_id)
            except CtrdError as exc:
                log.error("cri event not handled", topic=envelope.topic, error=str(exc))

    # -- pods -----------------------------------------------------------------------------

    async def run_pod(self, config: SandboxConfig) -> str:
        return await self.sandboxes.run(config)

    async def stop_pod(self, id_: str) -> None:
        await self.sandboxes.stop(id_, self.containers.stop_all)

    async def remove_pod(self, id_: str) -> None:
        await self.sandboxes.remove(id_, self.containers.remove_all)

    def pod(self, id_: str) -> Sandbox:
        return self.sandboxes.store.sandbox(id_)

    def pods(self) -> list[Sandbox]:
        return self.sandboxes.list()

    # -- containers -----------------------------------------------------------------------

    async def create_container(self, sandbox_id: str, config: ContainerConfig) -> str:
        return await self.containers.create(sandbox_id, config)

    def container(self, id_: str) -> Container:
        return self.containers.store.container(id_)

    def list_containers(self) -> list[Container]:
        return self.containers.list()

    async def pod_stats(self, id_: str) -> PodUsage | None:
        """Use of a ready pod (pause process and running containers); None if not ready."""
        sandbox = self.pod(id_)
        if sandbox.state != SandboxState.READY:
            return None
        try:
            own = stats.from_metrics(
                await self.sandboxes.tasks.get(NAMESPACE, sandbox.id).stats())
        except NotFound:
            return None
        per_container = {}
        for container in self.containers.store.containers_of(sandbox.id):
            usage = await self.containers.stats(container.id)
            if usage is not None:
                per_container[container.id] = usage
        interfaces = await asyncio.to_thread(stats.interfaces, sandbox.pid)
        return PodUsage(stats.total([own, *per_container.values()]), per_container, interfaces)
