"""The records a snapshotter backend keeps about its own snapshots, in SQLite.

Each backend owns one small database in its plugin root (as containerd's bolt
``metadata.db``). Snapshot ids are SQLite AUTOINCREMENT integers: never reused, and
short, which keeps overlay ``lowerdir`` option strings short for deep chains.
Keys here are the backend keys chosen by the namespaced metadata layer.

Callers run every method in a worker thread; a lock serialises transactions because
one connection is shared by those threads.
"""
from __future__ import annotations

import enum
import sqlite3
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from ctrd.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound

from ..metadata import labels as labelutil

_SCHEMA = """
CREATE TABLE IF NOT EXISTS snapshots (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    key TEXT NOT NULL UNIQUE,
    parent INTEGER REFERENCES snapshots(id),
    kind INTEGER NOT NULL,
    labels TEXT NOT NULL DEFAULT '{}',
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL,
    size INTEGER NOT NULL DEFAULT 0,
    inodes INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS snapshots_by_parent ON snapshots(parent);
"""


class Kind(enum.IntEnum):
    """Snapshot kinds, numbered as the snapshots.v1 protobuf enum numbers them."""

    VIEW = 1
    ACTIVE = 2
    COMMITTED = 3


@dataclass
class Info:
    name: str
    parent: str
    kind: Kind
    labels: dict[str, str] = field(default_factory=dict)
    created_at: int = 0
    updated_at: int = 0


@dataclass(frozen=True)
class Snapshot:
    """What a backend needs to lay out a snapshot: its id and its parents' ids, nearest first."""

    id: str
    kind: Kind
    parent_ids: tuple[str, ...]


@dataclass(frozen=True)
class Usage:
    size: int = 0
    inodes: int = 0


class MetaStore:
    def __init__(self, path: Path) -> None:
        self._conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False,
                                     timeout=30)
        self._conn.row_factory = sqlite3.Row
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=FULL")
        self._conn.execute("PRAGMA foreign_keys=ON")
        self._conn.executescript(_SCHEMA)
        self._lock = threading.Lock()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """A write transaction; disk work done inside it is undone by the caller on error."""
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
                self._conn.execute("COMMIT")
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise

    def close(self) -> None:
        with self._lock:
            self._conn.close()


def _row(conn: sqlite3.Connection, key: str) -> sqlite3.Row:
    row = conn.execute("SELECT * FROM snapshots WHERE key=?", (key,)).fetchone()
    if row is None:
        raise NotFound(f"snapshot {key}: not found")
    return row


def _parent_ids(conn: sqlite3.Connection, parent: int | None) -> tuple[str, ...]:
    ids: list[str] = []
    while parent is not None:
        ids.append(str(parent))
        parent = conn.execute("SELECT parent FROM snapshots WHERE id=?",
                              (parent,)).fetchone()["parent"]
    return tuple(ids)


def _info(conn: sqlite3.Connection, row: sqlite3.Row) -> Info:
    parent = ""
    if row["parent"] is not None:
        parent = conn.execute("SELECT key FROM snapshots WHERE id=?",
                              (row["parent"],)).fetchone()["key"]
    return Info(row["key"], parent, Kind(row["kind"]), labelutil.loads(row["labels"]),
                row["created_at"], row["updated_at"])


def get_info(conn: sqlite3.Connection, key: str) -> tuple[str, Info, Usage]:
    row = _row(conn, key)
    return str(row["id"]), _info(conn, row), Usage(row["size"], row["inodes"])


def get_snapshot(conn: sqlite3.Connection, key: str) -> Snapshot:
    """The layout of an active or view snapshot; committed ones have no mounts."""
    row = _row(conn, key)
    if row["kind"] not in (Kind.ACTIVE, Kind.VIEW):
        raise FailedPrecondition(f"requested snapshot {key} not active or view")
    return Snapshot(str(row["id"]), Kind(row["kind"]), _parent_ids(conn, row["parent"]))


def walk(conn: sqlite3.Connection) -> list[Info]:
    return [_info(conn, row) for row in conn.execute("SELECT * FROM snapshots ORDER BY key")]


def create(conn: sqlite3.Connection, kind: Kind, key: str, parent: str,
           labels: Mapping[str, str]) -> Snapshot:
    if kind not in (Kind.ACTIVE, Kind.VIEW):
        raise InvalidArgument(f"snapshot type {kind.name} invalid; only snapshots of type "
                              "Active or View can be created")
    parent_id: int | None = None
    if parent:
        prow = conn.execute("SELECT id, kind FROM snapshots WHERE key=?", (parent,)).fetchone()
        if prow is None:
            raise NotFound(f'missing parent "{parent}" bucket: not found')
        if prow["kind"] != Kind.COMMITTED:
            raise InvalidArgument(f'parent "{parent}" is not committed snapshot')
        parent_id = prow["id"]
    now = time.time_ns()
    try:
        cur = conn.execute(
            "INSERT INTO snapshots(key, parent, kind, labels, created_at, updated_at) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            (key, parent_id, int(kind), labelutil.dumps(labels), now, now))
    except sqlite3.IntegrityError:
        raise AlreadyExists(f"snapshot {key}: already exists") from None
    return Snapshot(str(cur.lastrowid), kind, _parent_ids(conn, parent_id))


def commit_active(conn: sqlite3.Connection, key: str, name: str, usage: Usage,
                  labels: Mapping[str, str]) -> str:
    """Turn active ``key`` into committed ``name``; the id, and so the directory, stays."""
    if conn.execute("SELECT 1 FROM snapshots WHERE key=?", (name,)).fetchone():
        raise AlreadyExists(f"committed snapshot {name}: already exists")
    row = _row(conn, key)
    if row["kind"] != Kind.ACTIVE:
        raise FailedPrecondition(f'snapshot "{key}" is not active')
    now = time.time_ns()
    # Labels are replaced, not inherited, as containerd does on commit.
    conn.execute("UPDATE snapshots SET key=?, kind=?, labels=?, created_at=?, updated_at=?, "
                 "size=?, inodes=? WHERE id=?",
                 (name, int(Kind.COMMITTED), labelutil.dumps(labels), now, now,
                  usage.size, usage.inodes, row["id"]))
    return str(row["id"])


def remove(conn: sqlite3.Connection, key: str) -> tuple[str, Kind]:
    row = _row(conn, key)
    if conn.execute("SELECT 1 FROM snapshots WHERE parent=? LIMIT 1", (row["id"],)).fetchone():
        raise FailedPrecondition("cannot remove snapshot with child")
    conn.execute("DELETE FROM snapshots WHERE id=?", (row["id"],))
    return str(row["id"]), Kind(row["kind"])


def update_labels(conn: sqlite3.Connection, key: str, labels: Mapping[str, str]) -> Info:
    row = _row(conn, key)
    conn.execute("UPDATE snapshots SET labels=?, updated_at=? WHERE id=?",
                 (labelutil.dumps(labels), time.time_ns(), row["id"]))
    return _info(conn, _row(conn, key))


def id_map(conn: sqlite3.Connection) -> dict[str, str]:
    return {str(r["id"]): r["key"] for r in conn.execute("SELECT id, key FROM snapshots")}
