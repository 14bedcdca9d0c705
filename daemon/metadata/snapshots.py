"""The namespaced view of the snapshotters, over the ``snapshots`` table.

Every namespace sees its own keys; each row maps (namespace, snapshotter, key) to the
key the backend knows, ``<namespace>/<sequence>/<key>``, unique across namespaces.
Backend calls that create or commit run inside the metadata write transaction, so a
backend failure rolls the row back and a row is never left without its snapshot.
Removal deletes the row first and the backend snapshot right after; a backend
snapshot left behind by a crash in between has no row and ``cleanup_orphans``
(called by the garbage collector, and by Cleanup) removes it.
"""
from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import structlog

from ctrd import filters
from ctrd.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound

from ..plugin import METADATA, SNAPSHOT, InitContext
from ..snapshots.backend import INHERITED_LABEL_PREFIX, Backend
from ..snapshots.mounts import Mount
from ..snapshots.storage import Kind, Usage
from . import labels as labelutil
from . import leases
from .db import Database
from .namespaces import ensure

log = structlog.get_logger()

# Clients name the snapshot an unpack is going to produce with this label, so that a
# second unpack of the same layer learns at once that it exists.
SNAPSHOT_REF_LABEL = "containerd.io/snapshot.ref"
_KIND_NAMES = {Kind.VIEW: "view", Kind.ACTIVE: "active", Kind.COMMITTED: "committed"}


@dataclass
class SnapshotInfo:
    name: str
    parent: str = ""
    kind: Kind = Kind.COMMITTED
    labels: dict[str, str] = field(default_factory=dict)
    created_at: int = 0
    updated_at: int = 0


def _info(row: sqlite3.Row) -> SnapshotInfo:
    return SnapshotInfo(row["key"], row["parent"], Kind(row["kind"]),
                        labelutil.loads(row["labels"]), row["created_at"], row["updated_at"])


def _adaptor(info: SnapshotInfo) -> filters.Adaptor:
    return filters.adapt({"kind": _KIND_NAMES[info.kind], "name": info.name,
                          "parent": info.parent, "labels": info.labels})


def _row(conn: sqlite3.Connection, ns: str, sn: str, key: str) -> sqlite3.Row:
    row = conn.execute("SELECT * FROM snapshots WHERE namespace=? AND snapshotter=? AND key=?",
                       (ns, sn, key)).fetchone()
    if row is None:
        raise NotFound(f"snapshot {key} does not exist")
    return row


class SnapshotStore:
    def __init__(self, db: Database, backends: Mapping[str, Backend]) -> None:
        self.db = db
        self.backends = dict(backends)
        self._last_seq = 0

    def backend(self, name: str) -> Backend:
        if not name:
            raise InvalidArgument("snapshotter argument missing")
        try:
            return self.backends[name]
        except KeyError:
            raise InvalidArgument(f"snapshotter not loaded: {name}") from None

    def _backend_key(self, ns: str, key: str) -> str:
        # Strictly increasing even if the clock is not; only the writer thread calls it.
        self._last_seq = max(self._last_seq + 1, time.time_ns())
        return f"{ns}/{self._last_seq}/{key}"

    # -- creation -------------------------------------------------------------

    async def prepare(self, ns: str, sn: str, key: str, parent: str,
                      labels: Mapping[str, str], lease: str | None = None) -> list[Mount]:
        return await self._create(ns, sn, key, parent, labels, lease, Kind.ACTIVE)

    async def view(self, ns: str, sn: str, key: str, parent: str,
                   labels: Mapping[str, str], lease: str | None = None) -> list[Mount]:
        return await self._create(ns, sn, key, parent, labels, lease, Kind.VIEW)

    async def _create(self, ns: str, sn: str, key: str, parent: str, labels: Mapping[str, str],
                      lease: str | None, kind: Kind) -> list[Mount]:
        backend = self.backend(sn)
        if not key:
            raise InvalidArgument("snapshot key must not be empty")
        labelutil.validate(labels, "info.Labels")
        inherited = {k: v for k, v in labels.items() if k.startswith(INHERITED_LABEL_PREFIX)}
        target = labels.get(SNAPSHOT_REF_LABEL, "")

        def tx(conn: sqlite3.Connection) -> list[Mount]:
            ensure(conn, ns)
            find = "SELECT 1 FROM snapshots WHERE namespace=? AND snapshotter=? AND key=?"
            if target and conn.execute(find, (ns, sn, target)).fetchone():
                raise AlreadyExists(f'target snapshot "{target}": already exists')
            if conn.execute(find, (ns, sn, key)).fetchone():
                raise AlreadyExists(f'snapshot "{key}": already exists')
            bparent = ""
            if parent:
                prow = conn.execute(
                    "SELECT backend_key FROM snapshots WHERE namespace=? AND snapshotter=? "
                    "AND key=?", (ns, sn, parent)).fetchone()
                if prow is None:
                    raise NotFound(f"parent snapshot {parent} does not exist")
                bparent = prow["backend_key"]
            bkey = self._backend_key(ns, key)
            now = time.time_ns()
            conn.execute(
                "INSERT INTO snapshots(namespace, snapshotter, key, backend_key, parent, kind, "
                "labels, created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (ns, sn, key, bkey, parent, int(kind), labelutil.dumps(labels), now, now))
            if lease:
                leases.attach(conn, ns, lease, f"snapshots/{sn}", key)
            create = backend.prepare if kind == Kind.ACTIVE else backend.view
            return create(bkey, bparent, inherited)

        mounts = await self.db.write(tx)
        log.debug("snapshot created", namespace=ns, snapshotter=sn, key=key, parent=parent,
                  kind=kind.name)
        return mounts

    async def commit(self, ns: str, sn: str, name: str, key: str, labels: Mapping[str, str],
                     lease: str | None = None) -> None:
        backend = self.backend(sn)
        if not name:
            raise InvalidArgument("snapshot name must not be empty")
        labelutil.validate(labels, "info.Labels")
        inherited = {k: v for k, v in labels.items() if k.startswith(INHERITED_LABEL_PREFIX)}

        def tx(conn: sqlite3.Connection) -> None:
            if conn.execute("SELECT 1 FROM snapshots WHERE namespace=? AND snapshotter=? "
                            "AND key=?", (ns, sn, name)).fetchone():
                raise AlreadyExists(f'snapshot "{name}": already exists')
            old = _row(conn, ns, sn, key)
            if old["kind"] != Kind.ACTIVE:
                raise FailedPrecondition(f'snapshot "{key}" is not active')
            bname = self._backend_key(ns, name)
            now = time.time_ns()
            conn.execute("DELETE FROM snapshots WHERE namespace=? AND snapshotter=? AND key=?",
                         (ns, sn, key))
            conn.execute(
                "INSERT INTO snapshots(namespace, snapshotter, key, backend_key, parent, kind, "
                "labels, created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (ns, sn, name, bname, old["parent"], int(Kind.COMMITTED),
                 labelutil.dumps(labels), now, now))
            if lease:
                leases.attach(conn, ns, lease, f"snapshots/{sn}", name)
            backend.commit(bname, old["backend_key"], inherited)

        await self.db.write(tx)
        log.debug("snapshot committed", namespace=ns, snapshotter=sn, key=key, name=name)

    # -- removal --------------------------------------------------------------

    async def remove(self, ns: str, sn: str, key: str) -> None:
        backend = self.backend(sn)

        def tx(conn: sqlite3.Connection) -> str:
            row = _row(conn, ns, sn, key)
            if conn.execute("SELECT 1 FROM snapshots WHERE namespace=? AND snapshotter=? "
                            "AND parent=? LIMIT 1", (ns, sn, key)).fetchone():
                raise FailedPrecondition("cannot remove snapshot with child")
            conn.execute("DELETE FROM snapshots WHERE namespace=? AND snapshotter=? AND key=?",
                         (ns, sn, key))
            return row["backend_key"]

        bkey = await self.db.write(tx)
        try:
            await asyncio.to_thread(backend.remove, bkey)
        except Exception as exc:  # noqa: BLE001 - the row is gone; cleanup retries later
            log.warning("backend snapshot removal failed", snapshotter=sn, backend_key=bkey,
                        error=str(exc))

    async def cleanup_orphans(self, snapshotter_name: str) -> list[str]:
        """Remove backend snapshots that no row of any namespace refers to, leaves first."""
        backend = self.backend(snapshotter_name)

        def orphans(conn: sqlite3.Connection) -> list:
            # On the writer thread, so no Prepare/Commit (which create the backend snapshot
            # inside their own write transaction) can slip in between reading the rows
            # and walking the backend. Once an orphan, always one: new rows only name new
            # backend keys or backend keys that have rows.
            referenced = {r[0] for r in conn.execute(
                "SELECT backend_key FROM snapshots WHERE snapshotter=?", (snapshotter_name,))}
            return [i for i in backend.walk() if i.name not in referenced]

        candidates = await self.db.write(orphans)

        def sweep() -> list[str]:
            infos = list(candidates)
            removed: list[str] = []
            progress = True
            while infos and progress:
                parents = {i.parent for i in backend.walk()}
                progress = False
                for info in [i for i in infos if i.name not in parents]:
                    backend.remove(info.name)
                    removed.append(info.name)
                    progress = True
                infos = [i for i in infos if i.name not in removed]
            return removed

        removed = await asyncio.to_thread(sweep)
        if removed:
            log.info("orphan snapshots removed", snapshotter=snapshotter_name,
                     count=len(removed))
        return removed

    async def cleanup(self, sn: str) -> None:
        backend = self.backend(sn)
        await self.cleanup_orphans(sn)
        await asyncio.to_thread(backend.cleanup)

    # -- queries --------------------------------------------------------------

    async def _backend_key_of(self, ns: str, sn: str, key: str) -> str:
        return (await self.db.read(lambda c: _row(c, ns, sn, key)))["backend_key"]

    async def stat(self, ns: str, sn: str, key: str) -> SnapshotInfo:
        self.backend(sn)
        return _info(await self.db.read(lambda c: _row(c, ns, sn, key)))

    async def mounts(self, ns: str, sn: str, key: str) -> list[Mount]:
        backend = self.backend(sn)
        return await asyncio.to_thread(backend.mounts, await self._backend_key_of(ns, sn, key))

    async def usage(self, ns: str, sn: str, key: str) -> Usage:
        backend = self.backend(sn)
        return await asyncio.to_thread(backend.usage, await self._backend_key_of(ns, sn, key))

    async def list(self, ns: str, sn: str, filter_exprs: Sequence[str] = ()) -> list[SnapshotInfo]:
        self.backend(sn)
        matcher = filters.parse_all(list(filter_exprs))
        rows = await self.db.read(lambda c: c.execute(
            "SELECT * FROM snapshots WHERE namespace=? AND snapshotter=? ORDER BY key",
            (ns, sn)).fetchall())
        return [i for i in map(_info, rows) if matcher.match(_adaptor(i))]

    async def update(self, ns: str, sn: str, info: SnapshotInfo,
                     paths: Sequence[str]) -> SnapshotInfo:
        self.backend(sn)
        if not info.name:
            raise InvalidArgument("snapshot name must be set for an update")
        labelutil.validate(info.labels, "info.Labels")
        for path in paths:
            if path != "labels" and not path.startswith("labels."):
                raise InvalidArgument(f'cannot update "{path}" field on snapshot "{info.name}"')

        def tx(conn: sqlite3.Connection) -> SnapshotInfo:
            row = _row(conn, ns, sn, info.name)
            current = labelutil.loads(row["labels"])
            new = labelutil.apply_paths(current, info.labels, paths) if paths else dict(info.labels)
            now = time.time_ns()
            conn.execute("UPDATE snapshots SET labels=?, updated_at=? WHERE namespace=? AND "
                         "snapshotter=? AND key=?", (labelutil.dumps(new), now, ns, sn, info.name))
            return _info(_row(conn, ns, sn, info.name))

        return await self.db.write(tx)


def init(ctx: InitContext) -> SnapshotStore:
    backends = ctx.get_all(SNAPSHOT)
    ctx.exports["snapshotters"] = ",".join(sorted(backends))
    return SnapshotStore(ctx.get(METADATA).db, backends)
