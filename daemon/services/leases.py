"""containerd.services.leases.v1.Leases over the lease store."""
from __future__ import annotations

import base64
import os
import time

from google.protobuf import empty_pb2

from ctrd.api.containerd.services.leases.v1 import leases_pb2 as pb
from ctrd.protoutil import timestamp

from ..gc.scheduler import Scheduler
from ..metadata.leases import Lease, LeaseStore, Resource
from ..plugin import GC, LEASE, InitContext
from .context import namespace
from .interceptor import Registrar


def _random_id() -> str:
    """An id in the shape containerd gives leases created without one."""
    return f"{time.time_ns() % 10**9}-{base64.urlsafe_b64encode(os.urandom(3)).decode()}"


def _to_pb(lease: Lease) -> pb.Lease:
    return pb.Lease(id=lease.id, labels=lease.labels, created_at=timestamp(lease.created_at))


def _resource(msg: pb.Resource) -> Resource:
    return Resource(msg.id, msg.type)


class LeasesService:
    def __init__(self, store: LeaseStore, gc: Scheduler) -> None:
        self.store = store
        self.gc = gc

    def register(self, server: Registrar) -> None:
        server.add_service(pb.DESCRIPTOR.services_by_name["Leases"], self)

    async def Create(self, request: pb.CreateRequest, context) -> pb.CreateResponse:
        lease = await self.store.create(namespace(context), request.id or _random_id(),
                                        dict(request.labels))
        return pb.CreateResponse(lease=_to_pb(lease))

    async def Delete(self, request: pb.DeleteRequest, context) -> empty_pb2.Empty:
        await self.store.delete(namespace(context), request.id)
        if request.sync:
            await self.gc.collect()
        else:
            self.gc.mark_dirty()
        return empty_pb2.Empty()

    async def List(self, request: pb.ListRequest, context) -> pb.ListResponse:
        leases = await self.store.list(namespace(context), list(request.filters))
        return pb.ListResponse(leases=[_to_pb(lease) for lease in leases])

    async def AddResource(self, request: pb.AddResourceRequest, context) -> empty_pb2.Empty:
        await self.store.add_resource(namespace(context), request.id, _resource(request.resource))
        return empty_pb2.Empty()

    async def DeleteResource(self, request: pb.DeleteResourceRequest,
                             context) -> empty_pb2.Empty:
        await self.store.delete_resource(namespace(context), request.id,
                                         _resource(request.resource))
        self.gc.mark_dirty()
        return empty_pb2.Empty()

    async def ListResources(self, request: pb.ListResourcesRequest,
                            context) -> pb.ListResourcesResponse:
        resources = await self.store.list_resources(namespace(context), request.id)
        return pb.ListResourcesResponse(
            resources=[pb.Resource(id=r.id, type=r.type) for r in resources])


def init(ctx: InitContext) -> LeasesService:
    return LeasesService(ctx.get(LEASE, "manager"), ctx.get(GC, "scheduler"))
