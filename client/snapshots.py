"""containerd.services.snapshots.v1 and diff.v1: filesystem layers and applying them."""
from __future__ import annotations

from dataclasses import dataclass, field

from google.protobuf import field_mask_pb2

from ctrd.api.containerd.services.diff.v1 import diff_pb2 as dpb
from ctrd.api.containerd.services.diff.v1 import diff_pb2_grpc as dpb_grpc
from ctrd.api.containerd.services.snapshots.v1 import snapshots_pb2 as pb
from ctrd.api.containerd.services.snapshots.v1 import snapshots_pb2_grpc as pb_grpc

from .connection import Connection
from .types import Descriptor, Mount, nanos

DEFAULT_SNAPSHOTTER = "overlayfs"


@dataclass(frozen=True)
class SnapshotInfo:
    name: str
    parent: str = ""
    kind: str = "unknown"  # view, active, committed
    created_at: int = 0
    updated_at: int = 0
    labels: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_pb(cls, msg: pb.Info) -> SnapshotInfo:
        return cls(msg.name, msg.parent, pb.Kind.Name(msg.kind).lower(), nanos(msg.created_at),
                   nanos(msg.updated_at), dict(msg.labels))


@dataclass(frozen=True)
class Usage:
    size: int
    inodes: int


class Snapshots:
    """One snapshotter's snapshots (``overlayfs`` unless told otherwise)."""

    def __init__(self, conn: Connection, snapshotter: str = DEFAULT_SNAPSHOTTER) -> None:
        self._conn = conn
        self._stub = pb_grpc.SnapshotsStub(conn.channel)
        self.snapshotter = snapshotter

    def using(self, snapshotter: str) -> Snapshots:
        return Snapshots(self._conn, snapshotter)

    async def prepare(self, key: str, parent: str = "",
                      labels: dict[str, str] | None = None) -> list[Mount]:
        resp = await self._conn.unary(self._stub.Prepare, pb.PrepareSnapshotRequest(
            snapshotter=self.snapshotter, key=key, parent=parent, labels=labels or {}))
        return [Mount.from_pb(m) for m in resp.mounts]

    async def view(self, key: str, parent: str = "",
                   labels: dict[str, str] | None = None) -> list[Mount]:
        resp = await self._conn.unary(self._stub.View, pb.ViewSnapshotRequest(
            snapshotter=self.snapshotter, key=key, parent=parent, labels=labels or {}))
        return [Mount.from_pb(m) for m in resp.mounts]

    async def mounts(self, key: str) -> list[Mount]:
        resp = await self._conn.unary(self._stub.Mounts, pb.MountsRequest(
            snapshotter=self.snapshotter, key=key))
        return [Mount.from_pb(m) for m in resp.mounts]

    async def commit(self, name: str, key: str, labels: dict[str, str] | None = None) -> None:
        await self._conn.unary(self._stub.Commit, pb.CommitSnapshotRequest(
            snapshotter=self.snapshotter, name=name, key=key, labels=labels or {}))

    async def remove(self, key: str) -> None:
        await self._conn.unary(self._stub.Remove, pb.RemoveSnapshotRequest(
            snapshotter=self.snapshotter, key=key))

    async def stat(self, key: str) -> SnapshotInfo:
        resp = await self._conn.unary(self._stub.Stat, pb.StatSnapshotRequest(
            snapshotter=self.snapshotter, key=key))
        return SnapshotInfo.from_pb(resp.info)

    async def set_labels(self, key: str, labels: dict[str, str]) -> SnapshotInfo:
        req = pb.UpdateSnapshotRequest(
            snapshotter=self.snapshotter,
            info=pb.Info(name=key, labels={k: v for k, v in labels.items() if v}),
            update_mask=field_mask_pb2.FieldMask(paths=[f"labels.{k}" for k in labels]))
        resp = await self._conn.unary(self._stub.Update, req)
        return SnapshotInfo.from_pb(resp.info)

    async def list(self, filters: list[str] | None = None) -> list[SnapshotInfo]:
        out: list[SnapshotInfo] = []
        req = pb.ListSnapshotsRequest(snapshotter=self.snapshotter, filters=filters or [])
        async for resp in self._conn.stream(self._stub.List, req):
            out.extend(SnapshotInfo.from_pb(i) for i in resp.info)
        return out

    async def usage(self, key: str) -> Usage:
        resp = await self._conn.unary(self._stub.Usage, pb.UsageRequest(
            snapshotter=self.snapshotter, key=key))
        return Usage(resp.size, resp.inodes)


class Diff:
    def __init__(self, conn: Connection) -> None:
        self._conn = conn
        self._stub = dpb_grpc.DiffStub(conn.channel)

    async def apply(self, layer: Descriptor, mounts: list[Mount]) -> Descriptor:
        """Unpack ``layer`` onto ``mounts``; returns the uncompressed (diff id) descriptor."""
        resp = await self._conn.unary(self._stub.Apply, dpb.ApplyRequest(
            diff=layer.to_pb(), mounts=[m.to_pb() for m in mounts]))
        return Descriptor.from_pb(resp.applied)
