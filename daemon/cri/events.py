"""Lifecycle events of CRI pods and containers, for GetContainerEvents subscribers.

kubelet's evented PLEG follows these instead of listing everything every second. A
subscriber that does not keep up loses events rather than growing the daemon's memory
(kubelet then falls back to relisting, which it does anyway from time to time).
"""
from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from enum import IntEnum

import structlog

log = structlog.get_logger()

QUEUE_LIMIT = 1000


class EventKind(IntEnum):
    """CRI's ContainerEventType values."""

    CREATED = 0
    STARTED = 1
    STOPPED = 2
    DELETED = 3


@dataclass(frozen=True)
class CRIEvent:
    id: str  # a container's, or a pod sandbox's for its own lifecycle
    sandbox_id: str
    kind: EventKind
    created_at: int = field(default_factory=time.time_ns)


class EventFeed:
    def __init__(self) -> None:
        self._queues: set[asyncio.Queue[CRIEvent]] = set()

    def publish(self, id_: str, sandbox_id: str, kind: EventKind) -> None:
        event = CRIEvent(id_, sandbox_id, kind)
        for queue in self._queues:
            try:
                queue.put_nowait(event)
            except asyncio.QueueFull:
                log.warning("cri event dropped for a slow subscriber", id=id_, kind=kind.name)

    async def subscribe(self) -> AsyncIterator[CRIEvent]:
        queue: asyncio.Queue[CRIEvent] = asyncio.Queue(QUEUE_LIMIT)
        self._queues.add(queue)
        try:
            while True:
                yield await queue.get()
        finally:
            self._queues.discard(queue)
