"""containerd.services.namespaces.v1: list, create, label and remove namespaces."""
from __future__ import annotations

from dataclasses import dataclass, field

from google.protobuf import field_mask_pb2

from ctrd.api.containerd.services.namespaces.v1 import namespace_pb2 as pb
from ctrd.api.containerd.services.namespaces.v1 import namespace_pb2_grpc as pb_grpc

from .connection import Connection


@dataclass(frozen=True)
class Namespace:
    name: str
    labels: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_pb(cls, msg: pb.Namespace) -> Namespace:
        return cls(msg.name, dict(msg.labels))


class Namespaces:
    def __init__(self, conn: Connection) -> None:
        self._conn = conn
        self._stub = pb_grpc.NamespacesStub(conn.channel)

    async def list(self, filter: str = "") -> list[Namespace]:
        resp = await self._conn.unary(self._stub.List, pb.ListNamespacesRequest(filter=filter))
        return [Namespace.from_pb(n) for n in resp.namespaces]

    async def get(self, name: str) -> Namespace:
        resp = await self._conn.unary(self._stub.Get, pb.GetNamespaceRequest(name=name))
        return Namespace.from_pb(resp.namespace)

    async def create(self, name: str, labels: dict[str, str] | None = None) -> Namespace:
        req = pb.CreateNamespaceRequest(namespace=pb.Namespace(name=name, labels=labels or {}))
        resp = await self._conn.unary(self._stub.Create, req)
        return Namespace.from_pb(resp.namespace)

    async def set_labels(self, name: str, labels: dict[str, str]) -> Namespace:
        """Set (or, with an empty value, remove) the given labels, leaving the others."""
        mask = field_mask_pb2.FieldMask(paths=[f"labels.{k}" for k in labels])
        req = pb.UpdateNamespaceRequest(
            namespace=pb.Namespace(name=name, labels={k: v for k, v in labels.items() if v}),
            update_mask=mask)
        resp = await self._conn.unary(self._stub.Update, req)
        return Namespace.from_pb(resp.namespace)

    async def delete(self, name: str) -> None:
        await self._conn.unary(self._stub.Delete, pb.DeleteNamespaceRequest(name=name))
