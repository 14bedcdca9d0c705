"""containerd.services.events.v1: the daemon's event stream."""
from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from google.protobuf import any_pb2, json_format

# Imported for their side effect: they register the event types so Anys decode.
from ctrd.api.containerd.events import (  # noqa: F401
    container_pb2, content_pb2, image_pb2, namespace_pb2, snapshot_pb2, task_pb2,
)
from ctrd.api.containerd.services.events.v1 import events_pb2 as pb
from ctrd.api.containerd.services.events.v1 import events_pb2_grpc as pb_grpc
from ctrd import errors, protoutil

from .connection import Connection
from .types import nanos


@dataclass(frozen=True)
class Event:
    timestamp: int
    namespace: str
    topic: str
    type: str  # the payload's type name
    payload: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_pb(cls, msg: pb.Envelope) -> Event:
        return cls(nanos(msg.timestamp), msg.namespace, msg.topic,
                   msg.event.type_url.rsplit("/", 1)[-1], decode(msg.event))


def decode(value: any_pb2.Any) -> dict[str, Any]:
    """An event payload as JSON-like data; unknown types keep only their size."""
    try:
        message = protoutil.unpack(value)
    except errors.InvalidArgument:
        return {"@unknown": value.type_url, "@bytes": len(value.value)}
    return json_format.MessageToDict(message, preserving_proto_field_name=True)


class Events:
    def __init__(self, conn: Connection) -> None:
        self._conn = conn
        self._stub = pb_grpc.EventsStub(conn.channel)

    async def subscribe(self, filters: list[str] | None = None) -> AsyncIterator[Event]:
        """Events of every namespace unless filtered (e.g. ``namespace==default``)."""
        req = pb.SubscribeRequest(filters=filters or [])
        async for envelope in self._conn.stream(self._stub.Subscribe, req, timeout=None):
            yield Event.from_pb(envelope)

    async def publish(self, topic: str, event: Any) -> None:
        await self._conn.unary(self._stub.Publish,
                               pb.PublishRequest(topic=topic, event=protoutil.pack(event)))
