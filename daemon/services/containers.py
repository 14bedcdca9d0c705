"""containerd.services.containers.v1.Containers over the container store."""
from __future__ import annotations

from collections.abc import AsyncIterator

from google.protobuf import any_pb2, empty_pb2

from ctrd.api.containerd.events import container_pb2 as ev
from ctrd.api.containerd.services.containers.v1 import containers_pb2 as pb
from ctrd.errors import InvalidArgument

from ..events.exchange import Exchange
from ..gc.scheduler import Scheduler
from ..metadata.containers import AnyValue, Container, ContainerStore
from ..plugin import EVENT, GC, METADATA, InitContext
from . import context as rpcctx
from .interceptor import Registrar


def any_to_value(a: any_pb2.Any) -> AnyValue:
    return AnyValue(a.type_url, a.value)


def value_to_any(v: AnyValue) -> any_pb2.Any:
    return any_pb2.Any(type_url=v.type_url, value=v.value)


def container_from_pb(c: pb.Container) -> Container:
    runtime = c.runtime if c.HasField("runtime") else None
    return Container(
        id=c.id,
        runtime_name=runtime.name if runtime else "",
        runtime_options=(any_to_value(runtime.options)
                         if runtime and runtime.HasField("options") else None),
        spec=any_to_value(c.spec) if c.HasField("spec") else None,
        labels=dict(c.labels),
        image=c.image,
        snapshotter=c.snapshotter,
        snapshot_key=c.snapshot_key,
        extensions={k: any_to_value(v) for k, v in c.extensions.items()},
    )


def container_to_pb(c: Container) -> pb.Container:
    return fill_container(pb.Container(), c)


def fill_container(msg: pb.Container, c: Container) -> pb.Container:
    """Set ``c`` into ``msg`` in place.

    Listings build a thousand of these: with upb, setting fields on embedded messages
    costs about half as much as building sub-messages and copying them in, and
    filling a list's own elements saves copying each container once more."""
    msg.id = c.id
    if c.labels:
        msg.labels.update(c.labels)
    msg.image = c.image
    runtime = msg.runtime
    runtime.name = c.runtime_name
    if c.runtime_options is not None:
        _set_any(runtime.options, c.runtime_options)
    if c.spec is not None:
        _set_any(msg.spec, c.spec)
    msg.snapshotter = c.snapshotter
    msg.snapshot_key = c.snapshot_key
    created, updated = msg.created_at, msg.updated_at
    created.seconds, created.nanos = divmod(c.created_at, 1_000_000_000)
    updated.seconds, updated.nanos = divmod(c.updated_at, 1_000_000_000)
    for key, value in c.extensions.items():
        _set_any(msg.extensions[key], value)
    return msg


def _set_any(target: any_pb2.Any, value: AnyValue) -> None:
    target.type_url = value.type_url
    target.value = value.value


class ContainersService:
    def __init__(self, store: ContainerStore, events: Exchange, gc: Scheduler) -> None:
        self.store = store
        self.events = events
        self.gc = gc

    def register(self, server: Registrar) -> None:
        server.add_service(pb.DESCRIPTOR.services_by_name["Containers"], self)

    async def Get(self, request: pb.GetContainerRequest, context) -> pb.GetContainerResponse:
        c = await self.store.get(rpcctx.namespace(context), request.id)
        return pb.GetContainerResponse(container=container_to_pb(c))

    async def List(self, request: pb.ListContainersRequest,
                   context) -> pb.ListContainersResponse:
        found = await self.store.list(rpcctx.namespace(context), list(request.filters))
        response = pb.ListContainersResponse()
        add = response.containers.add
        for c in found:
            fill_container(add(), c)
        return response

    async def ListStream(self, request: pb.ListContainersRequest,
                         context) -> AsyncIterator[pb.ListContainerMessage]:
        found = await self.store.list(rpcctx.namespace(context), list(request.filters))
        for c in found:
            msg = pb.ListContainerMessage()
            fill_container(msg.container, c)
            yield msg

    async def Create(self, request: pb.CreateContainerRequest,
                     context) -> pb.CreateContainerResponse:
        ns = rpcctx.namespace(context)
        created = await self.store.create(ns, container_from_pb(request.container))
        msg = container_to_pb(created)
        event = ev.ContainerCreate(id=created.id, image=created.image)
        event.runtime.name = created.runtime_name
        if created.runtime_options is not None:
            event.runtime.options.CopyFrom(value_to_any(created.runtime_options))
        await self.events.publish(ns, "/containers/create", event)
        return pb.CreateContainerResponse(container=msg)

    async def Update(self, request: pb.UpdateContainerRequest,
                     context) -> pb.UpdateContainerResponse:
        if not request.container.id:
            raise InvalidArgument("Container.ID required")
        ns = rpcctx.namespace(context)
        paths = list(request.update_mask.paths) if request.HasField("update_mask") else []
        updated = await self.store.update(ns, container_from_pb(request.container), paths)
        await self.events.publish(ns, "/containers/update", ev.ContainerUpdate(
            id=updated.id, image=updated.image, labels=updated.labels,
            snapshot_key=updated.snapshot_key))
        return pb.UpdateContainerResponse(container=container_to_pb(updated))

    async def Delete(self, request: pb.DeleteContainerRequest, context) -> empty_pb2.Empty:
        ns = rpcctx.namespace(context)
        await self.store.delete(ns, request.id)
        # The container was a GC root for its snapshot; collect what it alone kept alive.
        self.gc.mark_dirty()
        await self.events.publish(ns, "/containers/delete", ev.ContainerDelete(id=request.id))
        return empty_pb2.Empty()


def init(ctx: InitContext) -> ContainersService:
    return ContainersService(ContainerStore(ctx.get(METADATA).db), ctx.get(EVENT), ctx.get(GC))
