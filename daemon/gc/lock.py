"""A readers-writer lock for the event loop: many committers, or one sweeper."""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager


class SharedLock:
    """Commits hold it shared; the garbage collector's backend sweep holds it alone.

    A commit puts a blob on disk and then records it; a sweep that ran in between would
    see an unrecorded blob and delete it. Holding this lock across both steps closes
    that window without serialising commits against each other.
    """

    def __init__(self) -> None:
        self._readers = 0
        self._writer = False
        self._changed = asyncio.Condition()

    @asynccontextmanager
    async def shared(self) -> AsyncIterator[None]:
        async with self._changed:
            await self._changed.wait_for(lambda: not self._writer)
            self._readers += 1
        try:
            yield
        finally:
            async with self._changed:
                self._readers -= 1
                self._changed.notify_all()

    @asynccontextmanager
    async def exclusive(self) -> AsyncIterator[None]:
        async with self._changed:
            await self._changed.wait_for(lambda: not self._writer)
            self._writer = True
            await self._changed.wait_for(lambda: self._readers == 0)
        try:
            yield
        finally:
            async with self._changed:
                self._writer = False
                self._changed.notify_all()
