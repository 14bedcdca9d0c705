"""containerd's ttrpc events endpoint, ``<address>.ttrpc``: where shims send events.

Every shim v2 (ours and containerd's) forwards its ``/tasks/*`` events here through
``containerd.services.events.ttrpc.v1.Events/Forward``; they go into the exchange
unchanged, with the shim's own timestamp.
"""
from __future__ import annotations

import contextlib
import os

from google.protobuf import empty_pb2

from ctrd.api.containerd.services.ttrpc.events.v1 import events_pb2 as pb
from ctrd.protoutil import nanos
from ctrd.ttrpc import aio
from ctrd.ttrpc.codec import CallContext

from ..events.exchange import Envelope, Exchange


class EventsEndpoint:
    def __init__(self, exchange: Exchange, address: str) -> None:
        self.exchange = exchange
        self.address = address
        self.server = aio.Server(require_same_user=True)
        self.server.register_impl(pb.DESCRIPTOR.services_by_name["Events"], self)

    async def Forward(self, ctx: CallContext, request: pb.ForwardRequest) -> empty_pb2.Empty:
        e = request.envelope
        await self.exchange.forward(Envelope(nanos(e.timestamp), e.namespace, e.topic, e.event))
        return empty_pb2.Empty()

    async def start(self) -> None:
        await self.server.listen(self.address, mode=0o600)

    async def aclose(self) -> None:
        await self.server.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.address)
