"""containerd.services.streaming.v1.Streaming: client-opened streams for transfers."""
from __future__ import annotations

from google.protobuf import empty_pb2

from ctrd import protoutil
from ctrd.api.containerd.services.streaming.v1 import streaming_pb2 as pb
from ctrd.errors import InvalidArgument

from ..plugin import INTERNAL, InitContext
from ..rpc.call import Call
from ..rpc.status import EOF
from ..transfer.streams import Stream, StreamManager
from .context import NAMESPACE_KEY, metadata_value
from .interceptor import Registrar


class StreamingService:
    def __init__(self, manager: StreamManager) -> None:
        self.manager = manager

    def register(self, server: Registrar) -> None:
        server.add_service(pb.DESCRIPTOR.services_by_name["Streaming"], self)

    async def Stream(self, request_iterator, context: Call) -> None:
        first = await context.read()
        if first is EOF:
            return
        init = protoutil.unpack(first)
        if not isinstance(init, pb.StreamInit) or not init.id:
            raise InvalidArgument("the first stream message must be a StreamInit with an id")
        # Streams are looked up with the namespace of the request that uses them.
        namespace = metadata_value(context, NAMESPACE_KEY) or ""
        stream = Stream(context)
        self.manager.register(namespace, init.id, stream)
        try:
            await context.write(protoutil.pack(empty_pb2.Empty()))
            # Held open until the transfer using it closes it or the client goes away.
            context.add_done_callback(lambda _: stream.close())
            await stream.wait_closed()
        finally:
            self.manager.unregister(namespace, init.id)


def init_manager(ctx: InitContext) -> StreamManager:
    return StreamManager()


def init(ctx: InitContext) -> StreamingService:
    return StreamingService(ctx.get(INTERNAL, "streaming"))
