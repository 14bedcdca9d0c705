"""containerd.services.containers.v1.Containers over the container store."""
from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
from google.protobuf import any_pb2, empty_pb2

from ctrd.api.containerd.events import container_pb2 as ev
from ctrd.api.containerd.services.containers.v1 import containers_pb2 as pb
from ctrd.api.containerd.services.containers.v1 import containers_pb2_grpc as pb_grpc
from ctrd.errors import InvalidArgument
from ctrd.protoutil import timestamp

from ..events.exchange import Exchange
from ..metadata.containers import AnyValue, Container, ContainerStore
from ..gc.scheduler import Scheduler
from ..plugin import EVENT, GC, METADATA, InitContext
from . import context as rpcctx


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
    msg = pb.Container(id=c.id, labels=c.labels, image=c.image, snapshotter=c.snapshotter,
                       snapshot_key=c.snapshot_key,
                       created_at=timestamp(c.created_at), updated_at=timestamp(c.updated_at))
    msg.runtime.name = c.runtime_name
    if c.runtime_options is not None:
        msg.runtime.options.CopyFrom(value_to_any(c.runtime_options))
    if c.spec is not None:
        msg.spec.CopyFrom(value_to_any(c.spec))
    for key, value in c.extensions.items():
        msg.extensions[key].CopyFrom(value_to_any(value))
    return msg


class ContainersService(pb_grpc.ContainersServicer):
    def __init__(self, store: ContainerStore, events: Exchange, gc: Scheduler) -> None:
        self.store = store
        self.events = events
        self.gc = gc

    def register(self, server: grpc.aio.Server) -> None:
        pb_grpc.add_ContainersServicer_to_server(self, server)

    async def Get(self, request: pb.GetContainerRequest, context) -> pb.GetContainerResponse:
        c = await self.store.get(rpcctx.namespace(context), request.id)
        return pb.GetContainerResponse(container=container_to_pb(c))

    async def List(self, request: pb.ListContainersRequest,
                   context) -> pb.ListContainersResponse:
        found = await self.store.list(rpcctx.namespace(context), list(request.filters))
        return pb.ListContainersResponse(containers=[container_to_pb(c) for c in found])

    async def ListStream(self, request: pb.ListContainersRequest,
                         context) -> AsyncIterator[pb.ListContainerMessage]:
        found = await self.store.list(rpcctx.namespace(context), list(request.filters))
        for c in found:
            yield pb.ListContainerMessage(container=container_to_pb(c))

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
