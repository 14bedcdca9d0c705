"""The in-process event exchange: services publish, subscribers filter and receive.

Envelopes carry the event as an Any with containerd's type URL, so they can be handed
to `ctr events` and to shims' forwarders unchanged.
"""
from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

import structlog
from google.protobuf import any_pb2
from google.protobuf.message import Message

from ctrd import filters, identifiers
from ctrd.errors import InvalidArgument
from ctrd.protoutil import pack, unpack

log = structlog.get_logger()


@dataclass(frozen=True)
class Envelope:
    timestamp: int  # nanoseconds since the epoch
    namespace: str
    topic: str
    event: any_pb2.Any

    def field(self, path: tuple[str, ...]) -> str | None:
        """Filter adaptor: ``topic``, ``namespace`` and ``event.<field>...``."""
        if not path:
            return None
        head, rest = path[0], path[1:]
        if head == "topic" and not rest:
            return self.topic
        if head == "namespace" and not rest:
            return self.namespace
        if head == "event" and rest:
            try:
                value: object = unpack(self.event)
            except InvalidArgument:
                return None
            for name in rest:
                if isinstance(value, Message):
                    if name not in value.DESCRIPTOR.fields_by_name:
                        return None
                    value = getattr(value, name)
                elif hasattr(value, "get"):  # protobuf map
                    value = value.get(name)
                else:
                    return None
            return None if isinstance(value, Message) or value is None else str(value)
        return None


def validate_topic(topic: str) -> None:
    if not topic:
        raise InvalidArgument("must not be empty")
    if topic[0] != "/":
        raise InvalidArgument(f'envelope topic "{topic}": must start with \'/\'')
    if len(topic) == 1:
        raise InvalidArgument(f'envelope topic "{topic}": must have at least one component')
    for component in topic[1:].split("/"):
        try:
            identifiers.validate(component)
        except InvalidArgument as exc:
            raise InvalidArgument(
                f'envelope topic "{topic}": failed validation on component "{component}": {exc}'
            ) from None


class Exchange:
    def __init__(self) -> None:
        self._subscribers: set[asyncio.Queue[Envelope | None]] = set()

    async def publish(self, namespace: str, topic: str, event: Message) -> None:
        identifiers.validate(namespace)
        validate_topic(topic)
        self._broadcast(Envelope(time.time_ns(), namespace, topic, pack(event)))

    async def forward(self, envelope: Envelope) -> None:
        try:
            identifiers.validate(envelope.namespace)
        except InvalidArgument as exc:
            raise InvalidArgument(f"event envelope has invalid namespace: {exc}") from None
        validate_topic(envelope.topic)
        if envelope.timestamp == 0:
            raise InvalidArgument("timestamp must be set on forwarded event")
        self._broadcast(envelope)

    def _broadcast(self, envelope: Envelope) -> None:
        log.debug("event", topic=envelope.topic, namespace=envelope.namespace)
        for queue in self._subscribers:
            queue.put_nowait(envelope)

    async def subscribe(self, filter_exprs: Sequence[str] = ()) -> AsyncIterator[Envelope]:
        """Envelopes published from now on that match any of ``filter_exprs``.

        The filter is parsed before the first envelope is awaited, so a bad filter fails
        the call at once rather than at the first event.
        """
        matcher = filters.parse_all(list(filter_exprs))
        queue: asyncio.Queue[Envelope | None] = asyncio.Queue()
        self._subscribers.add(queue)
        return self._drain(queue, matcher)

    async def _drain(self, queue: asyncio.Queue[Envelope | None],
                     matcher: filters.Filter) -> AsyncIterator[Envelope]:
        try:
            while True:
                envelope = await queue.get()
                if envelope is None:
                    return
                if matcher.match(envelope.field):
                    yield envelope
        finally:
            self._subscribers.discard(queue)

    def close(self) -> None:
        """End every subscription (daemon shutdown)."""
        for queue in self._subscribers:
            queue.put_nowait(None)
