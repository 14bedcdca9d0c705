"""containerd.services.diff.v1.Diff over the walking differ."""
from __future__ import annotations

from ctrd.api.containerd.services.diff.v1 import diff_pb2 as pb
from ctrd.oci.descriptor import Descriptor

from ..diff.walking import WalkingDiffer
from ..plugin import DIFF, InitContext
from .context import lease, namespace
from .interceptor import Registrar
from .snapshots import mounts_from_pb


class DiffService:
    def __init__(self, differ: WalkingDiffer) -> None:
        self.differ = differ

    def register(self, server: Registrar) -> None:
        server.add_service(pb.DESCRIPTOR.services_by_name["Diff"], self)

    async def Apply(self, request: pb.ApplyRequest, context) -> pb.ApplyResponse:
        applied = await self.differ.apply(namespace(context), Descriptor.from_pb(request.diff),
                                          mounts_from_pb(request.mounts))
        return pb.ApplyResponse(applied=applied.to_pb())

    async def Diff(self, request: pb.DiffRequest, context) -> pb.DiffResponse:
        desc = await self.differ.compare(
            namespace(context), mounts_from_pb(request.left), mounts_from_pb(request.right),
            media_type=request.media_type, ref=request.ref, labels=dict(request.labels),
            lease=lease(context))
        return pb.DiffResponse(diff=desc.to_pb())


def init(ctx: InitContext) -> DiffService:
    return DiffService(ctx.get(DIFF, "walking"))
