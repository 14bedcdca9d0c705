"""In-process content, image and lease stores on a temporary database, for tests of
the distribution code that need no daemon around it."""
from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from ctrd.daemon.content.store import ContentStore
from ctrd.daemon.metadata.content import ContentService
from ctrd.daemon.metadata.db import Database
from ctrd.daemon.metadata.images import ImageStore
from ctrd.daemon.metadata.leases import LeaseStore
from ctrd.daemon.transfer.pull import Stores


@asynccontextmanager
async def temporary_stores(folder: Path) -> AsyncIterator[Stores]:
    db = Database(folder / "meta.db")
    await db.open()
    blobs = ContentStore(folder / "content")
    blobs.open()
    try:
        yield Stores(content=ContentService(db, blobs), images=ImageStore(db),
                     leases=LeaseStore(db))
    finally:
        await db.close()
