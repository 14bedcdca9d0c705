"""containerd.services.diff.v1.Diff over the walking differ."""
from __future__ import annotations

import grpc

from ctrd.api.containerd.services.diff.v1 import diff_pb2 as pb
from ctrd.api.containerd.services.diff.v1 import diff_pb2_grpc as pb_grpc
from ctrd.api.containerd.types import descriptor_pb2

from ..diff.walking import Descriptor, WalkingDiffer
from ..plugin import DIFF, InitContext
from .context import lease, namespace
from .snapshots import mounts_from_pb


def _desc_to_pb(desc: Descriptor) -> descriptor_pb2.Descriptor:
    return descriptor_pb2.Descriptor(media_type=desc.media_type, digest=desc.digest,
                                     size=desc.size, annotations=dict(desc.annotations))


class DiffService(pb_grpc.DiffServicer):
    def __init__(self, differ: WalkingDiffer) -> None:
        self.differ = differ

    def register(self, server: grpc.aio.Server) -> None:
        pb_grpc.add_DiffServicer_to_server(self, server)

    async def Apply(self, request: pb.ApplyRequest, context) -> pb.ApplyResponse:
        d = request.diff
        desc = Descriptor(d.media_type, d.digest, d.size, dict(d.annotations))
        applied = await self.differ.apply(namespace(context), desc,
                                          mounts_from_pb(request.mounts))
        return pb.ApplyResponse(applied=_desc_to_pb(applied))

    async def Diff(self, request: pb.DiffRequest, context) -> pb.DiffResponse:
        desc = await self.differ.compare(
            namespace(context), mounts_from_pb(request.left), mounts_from_pb(request.right),
            media_type=request.media_type, ref=request.ref, labels=dict(request.labels),
            lease=lease(context))
        return pb.DiffResponse(diff=_desc_to_pb(desc))


def init(ctx: InitContext) -> DiffService:
    return DiffService(ctx.get(DIFF, "walking"))
