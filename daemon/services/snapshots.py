"""containerd.services.snapshots.v1.Snapshots over the namespaced snapshot store."""
from __future__ import annotations

from collections.abc import AsyncIterator, Sequence

from google.protobuf import empty_pb2

from ctrd.api.containerd.events import snapshot_pb2 as ev
from ctrd.api.containerd.services.snapshots.v1 import snapshots_pb2 as pb
from ctrd.api.containerd.types import mount_pb2
from ctrd.protoutil import nanos, timestamp

from ..events.exchange import Exchange
from ..gc.scheduler import Scheduler
from ..metadata.snapshots import SnapshotInfo, SnapshotStore
from ..plugin import EVENT, GC, SERVICE, InitContext
from ..snapshots.mounts import Mount
from ..snapshots.storage import Kind
from .context import lease, namespace
from .interceptor import Registrar

# containerd streams List results in batches of this many.
_LIST_BATCH = 100


def mounts_to_pb(mounts: Sequence[Mount]) -> list[mount_pb2.Mount]:
    return [mount_pb2.Mount(type=m.type, source=m.source, options=list(m.options))
            for m in mounts]


def mounts_from_pb(mounts: Sequence[mount_pb2.Mount]) -> list[Mount]:
    return [Mount(m.type, m.source, tuple(m.options)) for m in mounts]


def _to_pb(info: SnapshotInfo) -> pb.Info:
    return pb.Info(name=info.name, parent=info.parent, kind=int(info.kind),
                   created_at=timestamp(info.created_at), updated_at=timestamp(info.updated_at),
                   labels=info.labels)


class SnapshotsService:
    def __init__(self, store: SnapshotStore, events: Exchange, gc: Scheduler) -> None:
        self.store = store
        self.events = events
        self.gc = gc

    def register(self, server: Registrar) -> None:
        server.add_service(pb.DESCRIPTOR.services_by_name["Snapshots"], self)

    async def Prepare(self, request: pb.PrepareSnapshotRequest,
                      context) -> pb.PrepareSnapshotResponse:
        ns = namespace(context)
        mounts = await self.store.prepare(ns, request.snapshotter, request.key, request.parent,
                                          dict(request.labels), lease(context))
        await self.events.publish(ns, "/snapshot/prepare",
                                  ev.SnapshotPrepare(key=request.key, parent=request.parent))
        return pb.PrepareSnapshotResponse(mounts=mounts_to_pb(mounts))

    async def View(self, request: pb.ViewSnapshotRequest, context) -> pb.ViewSnapshotResponse:
        ns = namespace(context)
        mounts = await self.store.view(ns, request.snapshotter, request.key, request.parent,
                                       dict(request.labels), lease(context))
        return pb.ViewSnapshotResponse(mounts=mounts_to_pb(mounts))

    async def Mounts(self, request: pb.MountsRequest, context) -> pb.MountsResponse:
        mounts = await self.store.mounts(namespace(context), request.snapshotter, request.key)
        return pb.MountsResponse(mounts=mounts_to_pb(mounts))

    async def Commit(self, request: pb.CommitSnapshotRequest, context) -> empty_pb2.Empty:
        ns = namespace(context)
        await self.store.commit(ns, request.snapshotter, request.name, request.key,
                                dict(request.labels), lease(context))
        await self.events.publish(ns, "/snapshot/commit",
                                  ev.SnapshotCommit(key=request.key, name=request.name))
        return empty_pb2.Empty()

    async def Remove(self, request: pb.RemoveSnapshotRequest, context) -> empty_pb2.Empty:
        ns = namespace(context)
        await self.store.remove(ns, request.snapshotter, request.key)
        # A removed snapshot may have been all that kept content or a parent alive.
        self.gc.mark_dirty()
        await self.events.publish(ns, "/snapshot/remove", ev.SnapshotRemove(key=request.key))
        return empty_pb2.Empty()

    async def Stat(self, request: pb.StatSnapshotRequest, context) -> pb.StatSnapshotResponse:
        info = await self.store.stat(namespace(context), request.snapshotter, request.key)
        return pb.StatSnapshotResponse(info=_to_pb(info))

    async def Update(self, request: pb.UpdateSnapshotRequest,
                     context) -> pb.UpdateSnapshotResponse:
        i = request.info
        info = SnapshotInfo(i.name, i.parent, Kind(i.kind) if i.kind else Kind.COMMITTED,
                            dict(i.labels), nanos(i.created_at), nanos(i.updated_at))
        paths = list(request.update_mask.paths) if request.HasField("update_mask") else []
        updated = await self.store.update(namespace(context), request.snapshotter, info, paths)
        return pb.UpdateSnapshotResponse(info=_to_pb(updated))

    async def List(self, request: pb.ListSnapshotsRequest,
                   context) -> AsyncIterator[pb.ListSnapshotsResponse]:
        infos = await self.store.list(namespace(context), request.snapshotter,
                                      list(request.filters))
        for start in range(0, len(infos), _LIST_BATCH):
            yield pb.ListSnapshotsResponse(
                info=[_to_pb(i) for i in infos[start:start + _LIST_BATCH]])

    async def Usage(self, request: pb.UsageRequest, context) -> pb.UsageResponse:
        usage = await self.store.usage(namespace(context), request.snapshotter, request.key)
        return pb.UsageResponse(size=usage.size, inodes=usage.inodes)

    async def Cleanup(self, request: pb.CleanupRequest, context) -> empty_pb2.Empty:
        namespace(context)
        await self.store.cleanup(request.snapshotter)
        return empty_pb2.Empty()


def init(ctx: InitContext) -> SnapshotsService:
    return SnapshotsService(ctx.get(SERVICE, "snapshots-service"), ctx.get(EVENT), ctx.get(GC))
