"""Sandboxes and containers of the CRI plugin: kept in memory, saved in the metadata DB.

Each CRI object is also a containerd container record in the ``k8s.io`` namespace
(so ``ctr -n k8s.io containers ls`` lists them, as with containerd), labelled with
its kind, and carrying the CRI record as JSON in an extension. Names are reserved
here: kubelet relies on CreateContainer/RunPodSandbox refusing a name in use.
"""
from __future__ import annotations

import asyncio
from typing import TypeVar

import structlog

from ctrd.api.containerd.events import container_pb2 as ev
from ctrd.errors import AlreadyExists, CtrdError, NotFound

from ..events.exchange import Exchange
from ..metadata.containers import AnyValue, ContainerStore
from ..metadata.containers import Container as Record
from . import records as codec
from .config import NAMESPACE
from .records import Container, Sandbox

log = structlog.get_logger()

KIND_LABEL = "io.cri-containerd.kind"
SANDBOX_ID_LABEL = "io.cri-containerd.sandbox-id"
SANDBOX_EXTENSION = "io.cri-containerd.sandbox.metadata"
CONTAINER_EXTENSION = "io.cri-containerd.container.metadata"
_TYPE_URL = "ctrd.dev/cri/{}"

T = TypeVar("T", Sandbox, Container)


class CRIStore:
    def __init__(self, records: ContainerStore, events: Exchange) -> None:
        self.records = records
        # containerd's CRI makes its containers through the containers service, so they
        # are announced as any other: ctrd's too.
        self.events = events
        self.sandboxes: dict[str, Sandbox] = {}
        self.containers: dict[str, Container] = {}
        self._names: dict[str, str] = {}  # reserved name -> id
        # One lock per object: lifecycle calls on one pod or container run one at a time.
        self._locks: dict[str, asyncio.Lock] = {}

    def lock(self, id_: str) -> asyncio.Lock:
        return self._locks.setdefault(id_, asyncio.Lock())

    def reserve(self, name: str, id_: str) -> None:
        owner = self._names.get(name)
        if owner is not None and owner != id_:
            raise AlreadyExists(f'name "{name}" is reserved for "{owner}"')
        self._names[name] = id_

    def release(self, name: str) -> None:
        self._names.pop(name, None)

    # -- lookups: a full id, or a unique prefix of one, as crictl allows -----------------

    def sandbox(self, id_: str) -> Sandbox:
        return self.sandboxes[_find(self.sandboxes, id_, "sandbox")]

    def container(self, id_: str) -> Container:
        return self.containers[_find(self.containers, id_, "container")]

    def containers_of(self, sandbox_id: str) -> list[Container]:
        return [c for c in self.containers.values() if c.sandbox_id == sandbox_id]

    # -- persistence ----------------------------------------------------------------------

    async def add_sandbox(self, sandbox: Sandbox, record: Record) -> None:
        record.labels[KIND_LABEL] = "sandbox"
        record.extensions[SANDBOX_EXTENSION] = _any(sandbox)
        await self._create(record)
        self.sandboxes[sandbox.id] = sandbox

    async def add_container(self, container: Container, record: Record) -> None:
        record.labels[KIND_LABEL] = "container"
        record.labels[SANDBOX_ID_LABEL] = container.sandbox_id
        record.extensions[CONTAINER_EXTENSION] = _any(container)
        await self._create(record)
        self.containers[container.id] = container

    async def _create(self, record: Record) -> None:
        await self.records.create(NAMESPACE, record)
        event = ev.ContainerCreate(id=record.id, image=record.image)
        event.runtime.name = record.runtime_name
        await self.events.publish(NAMESPACE, "/containers/create", event)

    async def save(self, obj: Sandbox | Container) -> None:
        """Write the current state of ``obj`` back to its record."""
        key = SANDBOX_EXTENSION if isinstance(obj, Sandbox) else CONTAINER_EXTENSION
        record = Record(id=obj.id, extensions={key: _any(obj)})
        await self.records.update(NAMESPACE, record, [f"extensions.{key}"])

    async def remove(self, obj: Sandbox | Container) -> None:
        try:
            await self.records.delete(NAMESPACE, obj.id)
            await self.events.publish(NAMESPACE, "/containers/delete",
                                      ev.ContainerDelete(id=obj.id))
        except NotFound:
            pass
        self.sandboxes.pop(obj.id, None)
        self.containers.pop(obj.id, None)
        self.release(obj.name)
        self._locks.pop(obj.id, None)

    async def load(self) -> None:
        """Read back every CRI record of the namespace (after a restart)."""
        for record in await self.records.list(NAMESPACE, [f'labels."{KIND_LABEL}"']):
            kind = record.labels.get(KIND_LABEL)
            try:
                if kind == "sandbox":
                    sandbox = _from(record, SANDBOX_EXTENSION, Sandbox)
                    self.sandboxes[sandbox.id] = sandbox
                    self._names[sandbox.name] = sandbox.id
                elif kind == "container":
                    container = _from(record, CONTAINER_EXTENSION, Container)
                    self.containers[container.id] = container
                    self._names[container.name] = container.id
            except CtrdError as exc:
                # Kept in the DB (never delete what cannot be read), skipped here.
                log.error("cri record unreadable", id=record.id, kind=kind, error=str(exc))
        log.info("cri records loaded", sandboxes=len(self.sandboxes),
                 containers=len(self.containers))


def _any(obj: Sandbox | Container) -> AnyValue:
    return AnyValue(_TYPE_URL.format(type(obj).__name__), codec.dumps(obj))


def _from(record: Record, key: str, cls: type[T]) -> T:
    value = record.extensions.get(key)
    if value is None:
        raise NotFound(f"{record.id}: no {key} extension")
    return codec.loads(cls, value.value)


def _find(table: dict[str, T], id_: str, what: str) -> str:
    if not id_:
        raise NotFound(f"{what} id is empty")
    if id_ in table:
        return id_
    found = [key for key in table if key.startswith(id_)]
    if len(found) == 1:
        return found[0]
    if not found:
        raise NotFound(f"{what} {id_!r} not found")
    raise NotFound(f"{what} id {id_!r} is ambiguous: {len(found)} match")
