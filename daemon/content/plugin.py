"""The content plugins: the blob store (CONTENT) and its namespaced face (SERVICE)."""
from __future__ import annotations

import asyncio

from ..metadata.content import ContentService
from ..plugin import CONTENT, EVENT, METADATA, InitContext
from .store import ContentStore


async def init_store(ctx: InitContext) -> ContentStore:
    store = ContentStore(ctx.root)
    await asyncio.to_thread(store.open)
    ctx.exports["root"] = str(ctx.root)
    return store


def init_service(ctx: InitContext) -> ContentService:
    return ContentService(ctx.get(METADATA).db, ctx.get(CONTENT, "content"),
                          ctx.get(EVENT).publish)
