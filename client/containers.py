"""containerd.services.containers.v1: container records (metadata only, no processes)."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from google.protobuf import any_pb2, field_mask_pb2

from ctrd import errors
from ctrd.api.containerd.services.containers.v1 import containers_pb2 as pb
from ctrd.api.containerd.services.containers.v1 import containers_pb2_grpc as pb_grpc

from .connection import Connection
from .types import nanos

# containerd stores a container's OCI spec as JSON in an Any with this type URL.
SPEC_TYPE_URL = "types.containerd.io/opencontainers/runtime-spec/1/Spec"
PROCESS_TYPE_URL = "types.containerd.io/opencontainers/runtime-spec/1/Process"
DEFAULT_RUNTIME = "io.containerd.runc.v2"


def pack_json(type_url: str, value: dict[str, Any]) -> any_pb2.Any:
    return any_pb2.Any(type_url=type_url, value=json.dumps(value).encode())


@dataclass(frozen=True)
class Container:
    id: str
    image: str = ""
    runtime: str = DEFAULT_RUNTIME
    spec: dict[str, Any] | None = None
    snapshotter: str = ""
    snapshot_key: str = ""
    labels: dict[str, str] = field(default_factory=dict)
    created_at: int = 0
    updated_at: int = 0
    extensions: tuple[str, ...] = ()  # names only; values are opaque to this client

    @classmethod
    def from_pb(cls, msg: pb.Container) -> Container:
        spec = None
        if msg.spec.value:
            try:
                spec = json.loads(msg.spec.value)
            except ValueError:
                spec = None
        return cls(msg.id, msg.image, msg.runtime.name, spec, msg.snapshotter, msg.snapshot_key,
                   dict(msg.labels), nanos(msg.created_at), nanos(msg.updated_at),
                   tuple(sorted(msg.extensions)))

    def to_pb(self) -> pb.Container:
        msg = pb.Container(id=self.id, image=self.image, labels=self.labels,
                           snapshotter=self.snapshotter, snapshot_key=self.snapshot_key,
                           runtime=pb.Container.Runtime(name=self.runtime))
        if self.spec is not None:
            msg.spec.CopyFrom(pack_json(SPEC_TYPE_URL, self.spec))
        return msg


class Containers:
    def __init__(self, conn: Connection) -> None:
        self._conn = conn
        self._stub = pb_grpc.ContainersStub(conn.channel)

    async def get(self, id: str) -> Container:
        if not id:
            raise errors.InvalidArgument("container id must not be empty")
        resp = await self._conn.unary(self._stub.Get, pb.GetContainerRequest(id=id))
        return Container.from_pb(resp.container)

    async def list(self, filters: list[str] | None = None) -> list[Container]:
        resp = await self._conn.unary(self._stub.List,
                                      pb.ListContainersRequest(filters=filters or []))
        return [Container.from_pb(c) for c in resp.containers]

    async def create(self, container: Container) -> Container:
        resp = await self._conn.unary(self._stub.Create,
                                      pb.CreateContainerRequest(container=container.to_pb()))
        return Container.from_pb(resp.container)

    async def set_labels(self, id: str, labels: dict[str, str]) -> Container:
        """Set the given labels (an empty value removes one), leaving the others."""
        msg = pb.Container(id=id, labels={k: v for k, v in labels.items() if v})
        req = pb.UpdateContainerRequest(
            container=msg, update_mask=field_mask_pb2.FieldMask(paths=[f"labels.{k}" for k in labels]))
        resp = await self._conn.unary(self._stub.Update, req)
        return Container.from_pb(resp.container)

    async def delete(self, id: str) -> None:
        await self._conn.unary(self._stub.Delete, pb.DeleteContainerRequest(id=id))
