"""containerd.services.events.v1.Events over the in-process exchange."""
from __future__ import annotations

import time
from collections.abc import AsyncIterator

from google.protobuf import empty_pb2

from ctrd.api.containerd.services.events.v1 import events_pb2 as pb
from ctrd.protoutil import nanos, timestamp

from ..events.exchange import Envelope, Exchange
from ..plugin import EVENT, InitContext
from . import context as rpcctx
from .interceptor import Registrar


def envelope_to_pb(env: Envelope) -> pb.Envelope:
    return pb.Envelope(timestamp=timestamp(env.timestamp), namespace=env.namespace,
                       topic=env.topic, event=env.event)


class EventsService:
    def __init__(self, exchange: Exchange) -> None:
        self.exchange = exchange

    def register(self, server: Registrar) -> None:
        server.add_service(pb.DESCRIPTOR.services_by_name["Events"], self)

    async def Publish(self, request: pb.PublishRequest, context) -> empty_pb2.Empty:
        # Publish stamps the time itself, like containerd; Forward keeps the sender's.
        env = Envelope(time.time_ns(), rpcctx.namespace(context), request.topic, request.event)
        await self.exchange.forward(env)
        return empty_pb2.Empty()

    async def Forward(self, request: pb.ForwardRequest, context) -> empty_pb2.Empty:
        e = request.envelope
        await self.exchange.forward(Envelope(nanos(e.timestamp), e.namespace, e.topic, e.event))
        return empty_pb2.Empty()

    async def Subscribe(self, request: pb.SubscribeRequest,
                        context) -> AsyncIterator[pb.Envelope]:
        stream = await self.exchange.subscribe(list(request.filters))
        async for env in stream:
            yield envelope_to_pb(env)



def init(ctx: InitContext) -> EventsService:
    return EventsService(ctx.get(EVENT))
