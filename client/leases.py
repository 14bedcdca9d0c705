"""containerd.services.leases.v1: keep content and snapshots alive while in use."""
from __future__ import annotations

import secrets
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from ctrd import errors
from ctrd.api.containerd.services.leases.v1 import leases_pb2 as pb
from ctrd.api.containerd.services.leases.v1 import leases_pb2_grpc as pb_grpc

from .connection import Connection
from .types import nanos

# The garbage collector drops a lease after this time even if its holder died.
EXPIRE_LABEL = "containerd.io/gc.expire"


@dataclass(frozen=True)
class Lease:
    id: str
    created_at: int = 0
    labels: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_pb(cls, msg: pb.Lease) -> Lease:
        return cls(msg.id, nanos(msg.created_at), dict(msg.labels))


@dataclass(frozen=True)
class Resource:
    id: str
    type: str


class Leases:
    def __init__(self, conn: Connection) -> None:
        self._conn = conn
        self._stub = pb_grpc.LeasesStub(conn.channel)

    async def create(self, id: str = "", labels: dict[str, str] | None = None,
                     expire_seconds: float | None = None) -> Lease:
        labels = dict(labels or {})
        if expire_seconds is not None:
            labels[EXPIRE_LABEL] = time.strftime(
                "%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + expire_seconds))
        resp = await self._conn.unary(
            self._stub.Create,
            pb.CreateRequest(id=id or f"ctrctl-{secrets.token_hex(8)}", labels=labels))
        return Lease.from_pb(resp.lease)

    async def delete(self, id: str, *, sync: bool = False) -> None:
        await self._conn.unary(self._stub.Delete, pb.DeleteRequest(id=id, sync=sync))

    async def list(self, filters: list[str] | None = None) -> list[Lease]:
        resp = await self._conn.unary(self._stub.List, pb.ListRequest(filters=filters or []))
        return [Lease.from_pb(lease) for lease in resp.leases]

    async def add_resource(self, id: str, resource: Resource) -> None:
        await self._conn.unary(self._stub.AddResource, pb.AddResourceRequest(
            id=id, resource=pb.Resource(id=resource.id, type=resource.type)))

    async def delete_resource(self, id: str, resource: Resource) -> None:
        await self._conn.unary(self._stub.DeleteResource, pb.DeleteResourceRequest(
            id=id, resource=pb.Resource(id=resource.id, type=resource.type)))

    async def resources(self, id: str) -> list[Resource]:
        resp = await self._conn.unary(self._stub.ListResources, pb.ListResourcesRequest(id=id))
        return [Resource(r.id, r.type) for r in resp.resources]

    @asynccontextmanager
    async def temporary(self, expire_seconds: float = 3600) -> AsyncIterator[str | None]:
        """A lease for the duration of a multi-step operation (import, unpack), deleted
        afterwards. Yields None when the daemon has no lease service: work then
        proceeds unprotected rather than not at all."""
        try:
            lease = await self.create(expire_seconds=expire_seconds)
        except errors.Unimplemented:
            yield None
            return
        try:
            yield lease.id
        finally:
            try:
                await self.delete(lease.id)
            except errors.NotFound:
                pass
