"""SQLite access for the metadata plugin.

One connection writes and one reads, each on its own thread, so the event loop never
blocks on disk and writes are serialised the way SQLite wants them. Every write is a
transaction (``BEGIN IMMEDIATE`` ... ``COMMIT``); WAL mode plus ``synchronous=FULL``
means a SIGKILL or power cut at any point leaves either the old or the new state,
never a partial record.
"""
from __future__ import annotations

import asyncio
import sqlite3
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

import structlog

from ctrd.errors import FailedPrecondition

from .schema import MIGRATIONS

T = TypeVar("T")
log = structlog.get_logger()


class Database:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._writer_pool = ThreadPoolExecutor(1, thread_name_prefix="db-write")
        self._reader_pool = ThreadPoolExecutor(1, thread_name_prefix="db-read")
        self._local = threading.local()
        # Bumped after every committed write; the garbage collector and caches watch it.
        self.generation = 0
        self._after_write: list[Callable[[], None]] = []

    def _connect(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=True,
                                   timeout=30)
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("PRAGMA foreign_keys=ON")
            self._local.conn = conn
        return conn

    async def open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        await asyncio.get_running_loop().run_in_executor(self._writer_pool, self._migrate)

    def _migrate(self) -> None:
        conn = self._connect()
        current = conn.execute("PRAGMA user_version").fetchone()[0]
        latest = len(MIGRATIONS)
        if current > latest:
            raise FailedPrecondition(
                f"metadata schema version {current} is newer than this ctrd ({latest}); "
                "refusing to open it with an older daemon")
        for version in range(current, latest):
            conn.execute("BEGIN IMMEDIATE")
            try:
                for statement in _statements(MIGRATIONS[version]):
                    conn.execute(statement)
                conn.execute(f"PRAGMA user_version={version + 1}")
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            log.info("metadata schema migrated", version=version + 1)

    def on_write(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` (on the event loop) after every committed write."""
        self._after_write.append(callback)

    async def write(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        def run() -> T:
            conn = self._connect()
            conn.execute("BEGIN IMMEDIATE")
            try:
                result = fn(conn)
                conn.execute("COMMIT")
                return result
            except BaseException:
                conn.execute("ROLLBACK")
                raise

        result = await asyncio.get_running_loop().run_in_executor(self._writer_pool, run)
        self.generation += 1
        for callback in self._after_write:
            callback()
        return result

    async def read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        def run() -> T:
            conn = self._connect()
            conn.execute("BEGIN")
            try:
                return fn(conn)
            finally:
                conn.execute("COMMIT")

        return await asyncio.get_running_loop().run_in_executor(self._reader_pool, run)

    async def close(self) -> None:
        def shut() -> None:
            conn = getattr(self._local, "conn", None)
            if conn is not None:
                conn.close()
                self._local.conn = None

        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._reader_pool, shut)
        await loop.run_in_executor(self._writer_pool, shut)
        self._reader_pool.shutdown()
        self._writer_pool.shutdown()


def _statements(script: str) -> list[str]:
    """Split a migration script into statements.

    ``executescript`` would commit on its own, breaking the one-transaction-per-migration
    rule, so statements are cut where SQLite itself says one is complete."""
    statements, buf = [], ""
    for line in script.splitlines(keepends=True):
        buf += line
        if sqlite3.complete_statement(buf):
            statements.append(buf.strip())
            buf = ""
    if buf.strip():
        statements.append(buf.strip())
    return statements
