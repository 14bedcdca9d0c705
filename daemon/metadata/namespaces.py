"""Namespaces: the top level of every metadata record."""
from __future__ import annotations

import sqlite3
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

from ctrd import identifiers
from ctrd.errors import AlreadyExists, FailedPrecondition, NotFound

from . import labels as labelutil
from .db import Database

# Tables whose rows keep a namespace from being deleted, with the word containerd uses.
_CONTENTS = [
    ("images", "images"),
    ("content", "blobs"),
    ("leases", "leases"),
    ("containers", "containers"),
]


@dataclass
class Namespace:
    name: str
    labels: dict[str, str] = field(default_factory=dict)


def ensure(conn: sqlite3.Connection, name: str) -> None:
    """Create ``name`` if absent: containerd makes a namespace exist by using it."""
    conn.execute("INSERT OR IGNORE INTO namespaces(name, labels, created_at) VALUES (?, '{}', ?)",
                 (name, time.time_ns()))


class NamespaceStore:
    def __init__(self, db: Database) -> None:
        self.db = db

    async def create(self, name: str, labels: Mapping[str, str]) -> Namespace:
        identifiers.validate(name)
        labelutil.validate(labels, "namespace.Labels")

        def tx(conn: sqlite3.Connection) -> None:
            try:
                conn.execute("INSERT INTO namespaces(name, labels, created_at) VALUES (?, ?, ?)",
                             (name, labelutil.dumps(labels), time.time_ns()))
            except sqlite3.IntegrityError:
                raise AlreadyExists(f'namespace "{name}": already exists') from None

        await self.db.write(tx)
        return Namespace(name, dict(labels))

    async def get(self, name: str) -> Namespace:
        row = await self.db.read(
            lambda c: c.execute("SELECT labels FROM namespaces WHERE name=?", (name,)).fetchone())
        if row is None:
            raise NotFound(f'namespace "{name}": not found')
        return Namespace(name, labelutil.loads(row["labels"]))

    async def list(self) -> list[Namespace]:
        rows = await self.db.read(
            lambda c: c.execute("SELECT name, labels FROM namespaces ORDER BY name").fetchall())
        return [Namespace(r["name"], labelutil.loads(r["labels"])) for r in rows]

    async def update(self, name: str, labels: Mapping[str, str],
                     paths: list[str] | None) -> Namespace:
        labelutil.validate(labels, "namespace.Labels")

        def tx(conn: sqlite3.Connection) -> dict[str, str]:
            row = conn.execute("SELECT labels FROM namespaces WHERE name=?", (name,)).fetchone()
            if row is None:
                raise NotFound(f'namespace "{name}": not found')
            current = labelutil.loads(row["labels"])
            new = labelutil.apply_paths(current, labels, paths) if paths else dict(labels)
            new = {k: v for k, v in new.items() if v}
            conn.execute("UPDATE namespaces SET labels=? WHERE name=?",
                         (labelutil.dumps(new), name))
            return new

        return Namespace(name, await self.db.write(tx))

    async def delete(self, name: str) -> None:
        def tx(conn: sqlite3.Connection) -> None:
            if conn.execute("SELECT 1 FROM namespaces WHERE name=?", (name,)).fetchone() is None:
                raise NotFound(f'namespace "{name}": not found')
            held = [word for table, word in _CONTENTS
                    if conn.execute(f"SELECT 1 FROM {table} WHERE namespace=? LIMIT 1",
                                    (name,)).fetchone()]
            held += [f'snapshots on "{r[0]}" snapshotter' for r in conn.execute(
                "SELECT DISTINCT snapshotter FROM snapshots WHERE namespace=? ORDER BY 1",
                (name,))]
            if held:
                raise FailedPrecondition(
                    f'namespace "{name}" must be empty, but it still has {", ".join(held)}')
            conn.execute("DELETE FROM ingests WHERE namespace=?", (name,))
            conn.execute("DELETE FROM namespaces WHERE name=?", (name,))

        await self.db.write(tx)
