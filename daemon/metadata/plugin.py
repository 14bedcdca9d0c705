"""The metadata plugin: the SQLite database and the stores every service builds on."""
from __future__ import annotations

from dataclasses import dataclass

from ..plugin import InitContext
from .db import Database
from .namespaces import NamespaceStore


@dataclass
class Metadata:
    db: Database
    namespaces: NamespaceStore

    async def aclose(self) -> None:
        await self.db.close()


async def init(ctx: InitContext) -> Metadata:
    db = Database(ctx.root / "meta.db")
    await db.open()
    ctx.exports["database"] = str(db.path)
    return Metadata(db=db, namespaces=NamespaceStore(db))
