"""When garbage is collected: shortly after deletions, on demand, and once at start-up.

Deletions call :meth:`Scheduler.mark_dirty`; the first one arms a timer of
``schedule_delay`` and later ones before it fires join the same run, so a burst of
deletions costs one collection. :meth:`collect` runs one at once (``sync`` deletes and
tests use it). Runs never overlap. The start-up run removes whatever files a crash
left behind between a collection's two steps.
"""
from __future__ import annotations

import asyncio
import inspect
import os
import time

import structlog

from ..config import duration
from ..metadata.db import Database
from ..metadata.content import ContentService
from ..plugin import METADATA, SERVICE, SNAPSHOT, InitContext, Registry
from . import collector

log = structlog.get_logger()

DEFAULT_DELAY = 0.1
STARTUP_DELAY = 0.1


class Scheduler:
    def __init__(self, db: Database, content: ContentService, registry: Registry,
                 delay: float = DEFAULT_DELAY) -> None:
        self.db = db
        self.content = content
        self.registry = registry
        self.delay = delay
        self._run_lock = asyncio.Lock()
        self._timer: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task] = set()
        self.last: collector.Report | None = None

    def start(self) -> None:
        self._arm(STARTUP_DELAY, everything=True)

    def mark_dirty(self) -> None:
        """Something was deleted: collect soon."""
        if self._timer is None:
            self._arm(self.delay, everything=False)

    def _arm(self, delay: float, everything: bool) -> None:
        loop = asyncio.get_running_loop()

        def fire() -> None:
            self._timer = None
            task = loop.create_task(self._background(everything))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

        self._timer = loop.call_later(delay, fire)

    async def _background(self, everything: bool) -> None:
        try:
            await self.collect(everything)
        except Exception:  # noqa: BLE001 - a failed run is retried at the next deletion
            log.exception("garbage collection failed")

    async def collect(self, everything: bool = False) -> collector.Report:
        """Collect now; ``everything`` also asks every snapshotter to drop orphans."""
        async with self._run_lock:
            start = time.monotonic()
            report = await self.db.write(collector.sweep_rows)
            await self._sweep_files(report)
            snapshotters = report.snapshotters
            if everything:
                snapshotters |= set(self.registry.get_all(SNAPSHOT))
            await self._cleanup_snapshots(snapshotters)
            report.seconds = time.monotonic() - start
            self.last = report
            log.info("garbage collected", content=len(report.content),
                     ingests=len(report.ingests), snapshots=len(report.snapshots),
                     leases=len(report.leases), blobs=len(report.blobs),
                     backend_ingests=len(report.backend_ingests),
                     seconds=round(report.seconds, 4))
            return report

    async def _sweep_files(self, report: collector.Report) -> None:
        store = self.content.store
        # Exclusive: no commit may sit between "file renamed in" and "row written".
        async with self.content.sweep_lock.exclusive():
            needed, store_refs = await self.db.read(collector.referenced_blobs)

            def sweep() -> list:
                for digest in store.list_blobs():
                    if digest not in needed:
                        try:
                            os.unlink(store.blob_path(digest))
                        except FileNotFoundError:
                            continue
                        report.blobs.append(digest)
                return store.orphan_ingests(store_refs)

            candidates = await asyncio.to_thread(sweep)
            if candidates:
                # Ingests are recorded before their folder is made: asking again now
                # spares any ingest that started while the folders were scanned.
                _, store_refs = await self.db.read(collector.referenced_blobs)
                report.backend_ingests.extend(
                    await asyncio.to_thread(store.remove_ingests, candidates, store_refs))

    async def _cleanup_snapshots(self, snapshotters: set[str]) -> None:
        if not snapshotters:
            return
        service = self.registry.get_all(SERVICE).get("snapshots-service")
        cleanup = getattr(service, "cleanup_orphans", None)
        if cleanup is None:
            return
        for name in sorted(snapshotters):
            try:
                result = cleanup(name)
                if inspect.isawaitable(result):
                    await result
            except Exception:  # noqa: BLE001 - one snapshotter must not stop the others
                log.exception("snapshotter cleanup failed", snapshotter=name)

    async def aclose(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


def init(ctx: InitContext) -> Scheduler:
    delay = duration(ctx.options.get("schedule_delay", f"{DEFAULT_DELAY}s"), "schedule_delay")
    scheduler = Scheduler(ctx.get(METADATA).db, ctx.get(SERVICE, "content-service"),
                          ctx.registry, delay)
    scheduler.content.on_delete(scheduler.mark_dirty)
    scheduler.start()
    return scheduler
