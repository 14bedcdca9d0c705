"""Leases: named, optionally expiring holds that keep resources from the garbage collector.

A lease protects what is attached to it: content (by digest), ingests (by ref) and
snapshots (by key, per snapshotter). Stores that create such resources under a lease
call :func:`attach` inside their own write transaction, so that the resource and its
protection appear together or not at all.
"""
from __future__ import annotations

import sqlite3
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone

from ctrd import filters
from ctrd.errors import AlreadyExists, InvalidArgument, NotFound, Unimplemented
from ctrd.oci import digest as digests

from . import labels as labelutil
from .db import Database
from .namespaces import ensure

EXPIRE_LABEL = "containerd.io/gc.expire"
FLAT_LABEL = "containerd.io/gc.flat"


@dataclass
class Lease:
    id: str
    labels: dict[str, str] = field(default_factory=dict)
    created_at: int = 0


@dataclass(frozen=True)
class Resource:
    id: str
    type: str  # "content", "ingests" or "snapshots/<snapshotter>"


def attach(conn: sqlite3.Connection, namespace: str, lease_id: str, rtype: str,
           rid: str) -> None:
    """Put resource ``rid`` of ``rtype`` under lease ``lease_id`` (call inside a write tx)."""
    if not _exists(conn, namespace, lease_id):
        raise NotFound(f'lease "{lease_id}": not found')
    conn.execute("INSERT OR IGNORE INTO lease_resources(namespace, lease, type, id) "
                 "VALUES (?, ?, ?, ?)", (namespace, lease_id, rtype, rid))


def detach(conn: sqlite3.Connection, namespace: str, lease_id: str, rtype: str,
           rid: str) -> None:
    """Drop a resource from a lease; a no-op if it was not there (call inside a write tx)."""
    conn.execute("DELETE FROM lease_resources WHERE namespace=? AND lease=? AND type=? AND id=?",
                 (namespace, lease_id, rtype, rid))


def expired(labels: Mapping[str, str], now_ns: int) -> bool:
    """Whether a lease's ``containerd.io/gc.expire`` time (RFC 3339) has passed.

    An unparsable value is ignored, as containerd ignores it: the lease never expires.
    """
    value = labels.get(EXPIRE_LABEL)
    if not value:
        return False
    try:
        when = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return False
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return when.timestamp() * 1e9 < now_ns


def _exists(conn: sqlite3.Connection, namespace: str, lease_id: str) -> bool:
    return conn.execute("SELECT 1 FROM leases WHERE namespace=? AND id=?",
                        (namespace, lease_id)).fetchone() is not None


def _check_resource(resource: Resource) -> Resource:
    kind, _, rest = resource.type.partition("/")
    if kind in ("content", "ingests"):
        if rest or "/" in resource.type:
            raise InvalidArgument(f"invalid resource type {resource.type}")
        if kind == "content":
            try:
                digests.validate(resource.id)
            except InvalidArgument as exc:
                raise InvalidArgument(
                    f"invalid content resource id {resource.id}: {exc}") from None
    elif kind == "snapshots":
        if not rest or "/" in rest:
            raise InvalidArgument(f"invalid snapshot resource type {resource.type}")
    else:
        raise Unimplemented(f"resource type {resource.type} not supported yet")
    return resource


def _adaptor(lease: Lease) -> filters.Adaptor:
    return filters.adapt({"id": lease.id, "labels": lease.labels})


class LeaseStore:
    def __init__(self, db: Database) -> None:
        self.db = db

    async def create(self, namespace: str, lease_id: str, labels: Mapping[str, str]) -> Lease:
        # containerd takes any non-empty id here (ctr's generated ones end in "_" at
        # times, which the identifier rules would refuse); only NUL is kept out.
        if not lease_id:
            raise InvalidArgument("lease id must be provided")
        if "\x00" in lease_id:
            raise InvalidArgument("lease id must not contain NUL characters")
        labelutil.validate(labels, "lease.Labels")
        lease = Lease(lease_id, dict(labels), time.time_ns())

        def tx(conn: sqlite3.Connection) -> None:
            ensure(conn, namespace)
            try:
                conn.execute("INSERT INTO leases(namespace, id, labels, created_at) "
                             "VALUES (?, ?, ?, ?)",
                             (namespace, lease_id, labelutil.dumps(labels), lease.created_at))
            except sqlite3.IntegrityError:
                raise AlreadyExists(f'lease "{lease_id}": already exists') from None

        await self.db.write(tx)
        return lease

    async def delete(self, namespace: str, lease_id: str) -> None:
        def tx(conn: sqlite3.Connection) -> None:
            cur = conn.execute("DELETE FROM leases WHERE namespace=? AND id=?",
                               (namespace, lease_id))
            if cur.rowcount == 0:
                raise NotFound(f'lease "{lease_id}": not found')
            # The foreign key cascades, but be explicit for databases opened without it.
            conn.execute("DELETE FROM lease_resources WHERE namespace=? AND lease=?",
                         (namespace, lease_id))

        await self.db.write(tx)

    async def list(self, namespace: str, filter_exprs: list[str]) -> list[Lease]:
        matcher = filters.parse_all(filter_exprs)
        rows = await self.db.read(lambda c: c.execute(
            "SELECT id, labels, created_at FROM leases WHERE namespace=? ORDER BY id",
            (namespace,)).fetchall())
        found = [Lease(r["id"], labelutil.loads(r["labels"]), r["created_at"]) for r in rows]
        return [lease for lease in found if matcher.match(_adaptor(lease))]

    async def add_resource(self, namespace: str, lease_id: str, resource: Resource) -> None:
        _check_resource(resource)
        await self.db.write(
            lambda c: attach(c, namespace, lease_id, resource.type, resource.id))

    async def delete_resource(self, namespace: str, lease_id: str, resource: Resource) -> None:
        _check_resource(resource)

        def tx(conn: sqlite3.Connection) -> None:
            if not _exists(conn, namespace, lease_id):
                raise NotFound(f'lease "{lease_id}": not found')
            detach(conn, namespace, lease_id, resource.type, resource.id)

        await self.db.write(tx)

    async def list_resources(self, namespace: str, lease_id: str) -> list[Resource]:
        def tx(conn: sqlite3.Connection) -> list[Resource]:
            if not _exists(conn, namespace, lease_id):
                raise NotFound(f'lease "{lease_id}": not found')
            rows = conn.execute(
                "SELECT type, id FROM lease_resources WHERE namespace=? AND lease=? "
                "ORDER BY type, id", (namespace, lease_id)).fetchall()
            return [Resource(r["id"], r["type"]) for r in rows]

        return await self.db.read(tx)
