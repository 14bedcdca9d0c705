"""containerd.services.namespaces.v1.Namespaces over the namespace store."""
from __future__ import annotations

from google.protobuf import empty_pb2

from ctrd.api.containerd.events import namespace_pb2 as ev
from ctrd.api.containerd.services.namespaces.v1 import namespace_pb2 as pb
from ctrd.errors import InvalidArgument

from ..events.exchange import Exchange
from ..metadata.namespaces import Namespace, NamespaceStore
from ..plugin import EVENT, METADATA, InitContext
from .interceptor import Registrar


def _to_pb(ns: Namespace) -> pb.Namespace:
    return pb.Namespace(name=ns.name, labels=ns.labels)


class NamespacesService:
    def __init__(self, store: NamespaceStore, events: Exchange) -> None:
        self.store = store
        self.events = events

    def register(self, server: Registrar) -> None:
        server.add_service(pb.DESCRIPTOR.services_by_name["Namespaces"], self)

    async def Get(self, request: pb.GetNamespaceRequest, context) -> pb.GetNamespaceResponse:
        return pb.GetNamespaceResponse(namespace=_to_pb(await self.store.get(request.name)))

    async def List(self, request: pb.ListNamespacesRequest, context) -> pb.ListNamespacesResponse:
        # containerd ignores the filter field of this request; so do we.
        return pb.ListNamespacesResponse(
            namespaces=[_to_pb(ns) for ns in await self.store.list()])

    async def Create(self, request: pb.CreateNamespaceRequest,
                     context) -> pb.CreateNamespaceResponse:
        ns = await self.store.create(request.namespace.name, dict(request.namespace.labels))
        await self.events.publish(ns.name, "/namespaces/create",
                                  ev.NamespaceCreate(name=ns.name, labels=ns.labels))
        return pb.CreateNamespaceResponse(namespace=_to_pb(ns))

    async def Update(self, request: pb.UpdateNamespaceRequest,
                     context) -> pb.UpdateNamespaceResponse:
        if not request.namespace.name:
            raise InvalidArgument("namespace name is required")
        paths = list(request.update_mask.paths) if request.HasField("update_mask") else []
        ns = await self.store.update(request.namespace.name, dict(request.namespace.labels), paths)
        # Like containerd, the event carries the labels the request sent, not the result.
        await self.events.publish(ns.name, "/namespaces/update", ev.NamespaceUpdate(
            name=ns.name, labels=dict(request.namespace.labels)))
        return pb.UpdateNamespaceResponse(namespace=_to_pb(ns))

    async def Delete(self, request: pb.DeleteNamespaceRequest, context) -> empty_pb2.Empty:
        await self.store.delete(request.name)
        await self.events.publish(request.name, "/namespaces/delete",
                                  ev.NamespaceDelete(name=request.name))
        return empty_pb2.Empty()


def init(ctx: InitContext) -> NamespacesService:
    metadata = ctx.get(METADATA)
    return NamespacesService(metadata.namespaces, ctx.get(EVENT))
