"""The namespaced content store: what each namespace sees of the shared blob store.

Blobs live once on disk (:mod:`ctrd.daemon.content.store`); a namespace *has* a blob
when the ``content`` table has a row for it, with that namespace's labels. Ingests are
recorded per namespace in ``ingests`` and point to a backend ingest under a key that is
unique to the namespace and ref. Like containerd's default "shared" policy, a writer
that expects a digest some other namespace already holds does not re-send the bytes:
its status reports the ingest complete and its commit only adds the row.

A lease (the ``containerd-lease`` of a request) protects the ingests and content
created under it; without one an ingest expires 24 hours after it was last opened.
"""
from __future__ import annotations

import asyncio
import secrets
import sqlite3
import time
from collections.abc import AsyncIterable, AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from ctrd import filters
from ctrd.api.containerd.events import content_pb2 as events_pb
from ctrd.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound, Unavailable
from ctrd.oci import digest as digests

from ..content.store import ContentStore, IngestWriter, validate_ref
from ..gc.lock import SharedLock
from . import labels as labelutil
from .db import Database
from .leases import attach, detach
from .namespaces import ensure

log = structlog.get_logger()

INGEST_EXPIRY_NS = 24 * 3600 * 10**9


@dataclass
class Info:
    digest: str
    size: int
    labels: dict[str, str] = field(default_factory=dict)
    created_at: int = 0
    updated_at: int = 0


@dataclass
class Status:
    ref: str
    offset: int
    total: int
    expected: str = ""
    started_at: int = 0
    updated_at: int = 0


def _info(row: sqlite3.Row) -> Info:
    return Info(row["digest"], row["size"], labelutil.loads(row["labels"]),
                row["created_at"], row["updated_at"])


def _check_digest(digest: str) -> None:
    try:
        digests.validate(digest)
    except InvalidArgument as exc:
        raise InvalidArgument(f"invalid digest {digest!r}: {exc}") from None


def _row(conn: sqlite3.Connection, namespace: str, digest: str) -> sqlite3.Row | None:
    return conn.execute("SELECT * FROM content WHERE namespace=? AND digest=?",
                        (namespace, digest)).fetchone()


class ContentService:
    """SERVICE plugin ``content-service``: the content API every other part uses."""

    def __init__(self, db: Database, store: ContentStore, publish=None) -> None:
        self.db = db
        self.store = store
        # publish(namespace, topic, message): the event exchange's publish, or None.
        self._publish = publish
        self.sweep_lock = SharedLock()
        self._on_delete: list[Callable[[], None]] = []
        self._writing: dict[tuple[str, str], int] = {}
        # Sizes of recently read blobs, valid while the database has not changed:
        # clients read a blob in many small ranged calls and each would query it again.
        self._sizes: dict[tuple[str, str], int] = {}
        self._sizes_generation = -1

    def on_delete(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` after content is deleted (the garbage collector listens)."""
        self._on_delete.append(callback)

    # ------------------------------------------------------------------ blobs

    async def info(self, namespace: str, digest: str) -> Info:
        """The namespace's record of ``digest``; NotFound if it lacks it or the blob is gone.

        The blob's size on disk is compared with the record (DataLoss and quarantine
        on mismatch); its content is not re-hashed here, see the store's docstring."""
        _check_digest(digest)
        row = await self.db.read(lambda c: _row(c, namespace, digest))
        if row is None:
            raise NotFound(f"content digest {digest}: not found")
        info = _info(row)
        try:
            await self.store.info(digest, expected_size=info.size)
        except NotFound:
            raise NotFound(f"content digest {digest}: not found (blob missing from the store)") \
                from None
        return info

    async def path(self, namespace: str, digest: str) -> Path:
        """Where the blob lives on disk, for readers that need a file (read-only!)."""
        await self.info(namespace, digest)
        return self.store.blob_path(digest)

    async def update(self, namespace: str, digest: str, labels: Mapping[str, str],
                     paths: list[str] | None = None) -> Info:
        _check_digest(digest)
        labelutil.validate(labels, "content.Labels")

        def tx(conn: sqlite3.Connection) -> Info:
            row = _row(conn, namespace, digest)
            if row is None:
                raise NotFound(f"content digest {digest}: not found")
            current = labelutil.loads(row["labels"])
            new = labelutil.apply_paths(current, labels, paths) if paths else dict(labels)
            new = {k: v for k, v in new.items() if v}
            labelutil.validate(new, "content.Labels")
            now = time.time_ns()
            conn.execute("UPDATE content SET labels=?, updated_at=? WHERE namespace=? AND digest=?",
                         (labelutil.dumps(new), now, namespace, digest))
            return Info(digest, row["size"], new, row["created_at"], now)

        return await self.db.write(tx)

    async def list(self, namespace: str, filter_exprs: list[str] | None = None) -> list[Info]:
        matcher = filters.parse_all(list(filter_exprs or []))
        rows = await self.db.read(lambda c: c.execute(
            "SELECT * FROM content WHERE namespace=? ORDER BY digest", (namespace,)).fetchall())
        found = [_info(r) for r in rows]
        return [i for i in found
                if matcher.match(filters.adapt({"digest": i.digest, "labels": i.labels}))]

    async def delete(self, namespace: str, digest: str, lease: str | None = None) -> None:
        """Forget ``digest`` in ``namespace``; the blob goes when no namespace has it."""
        _check_digest(digest)

        def tx(conn: sqlite3.Connection) -> None:
            cur = conn.execute("DELETE FROM content WHERE namespace=? AND digest=?",
                               (namespace, digest))
            if cur.rowcount == 0:
                raise NotFound(f"content digest {digest}: not found")
            if lease:
                detach(conn, namespace, lease, "content", digest)

        await self.db.write(tx)
        if self._publish is not None:
            await self._publish(namespace, "/content/delete",
                                events_pb.ContentDelete(digest=digest))
        for callback in self._on_delete:
            callback()

    async def read(self, namespace: str, digest: str, offset: int = 0,
                   size: int = 0) -> AsyncIterator[bytes]:
        """Chunks of the blob; the whole-blob case is verified (see the store)."""
        _check_digest(digest)
        recorded = await self._recorded_size(namespace, digest)
        return self.store.read(digest, offset, size, expected_size=recorded)

    async def read_small(self, namespace: str, digest: str, offset: int, size: int) -> bytes:
        """One small range in one piece (see the store's ``read_small``); while the
        blob's record is cached, this neither queries the database nor leaves the loop."""
        _check_digest(digest)
        recorded = await self._recorded_size(namespace, digest)
        return await self.store.read_small(digest, offset, size, expected_size=recorded)

    async def _recorded_size(self, namespace: str, digest: str) -> int:
        """The size the namespace's record gives ``digest``; NotFound without a record."""
        generation = self.db.generation
        if generation != self._sizes_generation:
            self._sizes = {}
            self._sizes_generation = generation
        recorded = self._sizes.get((namespace, digest))
        if recorded is None:
            row = await self.db.read(lambda c: _row(c, namespace, digest))
            if row is None:
                raise NotFound(f"content digest {digest}: not found")
            recorded = row["size"]
            if self.db.generation == generation and len(self._sizes) < 1024:
                self._sizes[(namespace, digest)] = recorded
        return recorded

    # ---------------------------------------------------------------- ingests

    async def writer(self, namespace: str, ref: str, total: int = 0, expected: str = "",
                     lease: str | None = None) -> "NamespacedWriter":
        """Open or resume the ingest ``ref``; AlreadyExists if the namespace has ``expected``.

        Unavailable if another writer holds ``ref`` (clients retry, as containerd's do).
        """
        validate_ref(ref)
        if expected:
            _check_digest(expected)
        if total < 0:
            raise InvalidArgument("total must not be negative")
        key = (namespace, ref)
        if key in self._writing:
            since = self._writing[key]
            raise Unavailable(
                f"ref {namespace}/{ref} locked for {(time.time_ns() - since) / 1e9:.2f}s "
                f"(since {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(since / 1e9))}): "
                "unavailable")
        self._writing[key] = time.time_ns()
        try:
            return await self._open_writer(namespace, ref, total, expected, lease)
        except BaseException:
            self._writing.pop(key, None)
            raise

    async def _open_writer(self, namespace: str, ref: str, total: int, expected: str,
                           lease: str | None) -> "NamespacedWriter":
        shared_size = None
        if expected:
            on_disk = await asyncio.to_thread(self.store.blob_path(expected).stat) \
                if await asyncio.to_thread(self.store.exists, expected) else None
            if on_disk is not None and total in (0, on_disk.st_size):
                shared_size = on_disk.st_size

        def tx(conn: sqlite3.Connection) -> tuple[str, bool]:
            ensure(conn, namespace)
            if expected and shared_size is not None and _row(conn, namespace, expected):
                if lease:
                    attach(conn, namespace, lease, "content", expected)
                return "", True
            found = conn.execute("SELECT store_ref FROM ingests WHERE namespace=? AND ref=?",
                                 (namespace, ref)).fetchone()
            store_ref = found["store_ref"] if found else \
                f"{namespace}/{secrets.token_hex(8)}/{ref}"
            expires = 0 if lease else time.time_ns() + INGEST_EXPIRY_NS
            conn.execute(
                "INSERT INTO ingests(namespace, ref, store_ref, expected, expires_at) "
                "VALUES (?, ?, ?, ?, ?) ON CONFLICT(namespace, ref) DO UPDATE SET "
                "expected=excluded.expected, expires_at=excluded.expires_at",
                (namespace, ref, store_ref, expected if shared_size is not None else "", expires))
            if lease:
                attach(conn, namespace, lease, "ingests", ref)
            return store_ref, False

        store_ref, exists = await self.db.write(tx)
        if exists:
            raise AlreadyExists(f"content {expected}: already exists")
        writer = NamespacedWriter(self, namespace, ref, store_ref, lease, total, expected)
        if shared_size is not None:
            writer.shared_size = shared_size
        else:
            await writer._open_backend(total)
        return writer

    async def status(self, namespace: str, ref: str) -> Status:
        validate_ref(ref)
        row = await self.db.read(lambda c: c.execute(
            "SELECT store_ref, expected FROM ingests WHERE namespace=? AND ref=?",
            (namespace, ref)).fetchone())
        if row is None:
            raise NotFound(f"ref {ref}: not found")
        if row["expected"]:
            size = (await self.store.info(row["expected"])).size
            return Status(ref, size, size, row["expected"])
        st = await self.store.status(row["store_ref"])
        return Status(ref, st.offset, st.total, "", st.started_at, st.updated_at)

    async def list_statuses(self, namespace: str,
                            filter_exprs: list[str] | None = None) -> list[Status]:
        matcher = filters.parse_all(list(filter_exprs or []))
        rows = await self.db.read(lambda c: c.execute(
            "SELECT ref FROM ingests WHERE namespace=? ORDER BY ref", (namespace,)).fetchall())
        found = []
        for row in rows:
            if not matcher.match(filters.adapt({"ref": row["ref"]})):
                continue
            try:
                found.append(await self.status(namespace, row["ref"]))
            except NotFound:
                continue  # recorded, but its backend ingest is gone (not started or swept)
        return found

    async def abort(self, namespace: str, ref: str, lease: str | None = None) -> None:
        validate_ref(ref)

        def tx(conn: sqlite3.Connection) -> sqlite3.Row:
            row = conn.execute("SELECT store_ref, expected FROM ingests WHERE namespace=? "
                               "AND ref=?", (namespace, ref)).fetchone()
            if row is None:
                raise NotFound(f"reference {ref}: not found")
            conn.execute("DELETE FROM ingests WHERE namespace=? AND ref=?", (namespace, ref))
            conn.execute("DELETE FROM lease_resources WHERE namespace=? AND type='ingests' "
                         "AND id=?", (namespace, ref))
            return row

        row = await self.db.write(tx)
        if not row["expected"]:
            try:
                await self.store.abort(row["store_ref"])
            except NotFound:
                pass  # the writer never got to create it

    async def write_blob(self, namespace: str, data: bytes | AsyncIterable[bytes],
                         expected: str, labels: Mapping[str, str] | None = None,
                         lease: str | None = None, ref: str | None = None) -> Info:
        """Write and commit one blob in one call; returns its record.

        If the namespace already has ``expected``, nothing is written and ``labels``
        (if any) are merged into the existing record.
        """
        _check_digest(expected)
        total = len(data) if isinstance(data, (bytes, bytearray, memoryview)) else 0
        ref = ref or f"write-blob-{expected}-{secrets.token_hex(4)}"
        try:
            writer = await self.writer(namespace, ref, total, expected, lease)
        except AlreadyExists:
            if labels:
                return await self.update(namespace, expected, labels,
                                         [f"labels.{k}" for k in labels])
            return await self.info(namespace, expected)
        try:
            if writer.shared_size is None:
                await writer.truncate()
                if isinstance(data, (bytes, bytearray, memoryview)):
                    view = memoryview(data)
                    for start in range(0, len(view), 1 << 20):
                        await writer.write(bytes(view[start:start + (1 << 20)]))
                else:
                    async for chunk in data:
                        if chunk:
                            await writer.write(chunk)
            try:
                return await writer.commit(total, expected, labels or {})
            except AlreadyExists:
                return await self.info(namespace, expected)
        finally:
            await writer.close()


class NamespacedWriter:
    """A writer for one namespace's ingest; see :class:`ContentService.writer`."""

    def __init__(self, service: ContentService, namespace: str, ref: str, store_ref: str,
                 lease: str | None, total: int, expected: str) -> None:
        self.service = service
        self.namespace = namespace
        self.ref = ref
        self.store_ref = store_ref
        self.lease = lease
        self.total = total
        self.expected = expected
        self.started_at = time.time_ns()
        # Set when the blob already exists on disk (another namespace has it): no backend
        # ingest is needed unless the client insists on writing bytes.
        self.shared_size: int | None = None
        self._backend: IngestWriter | None = None

    async def _open_backend(self, total: int) -> None:
        self._backend = await self.service.store.writer(self.store_ref, total)
        self.total = self._backend.total  # a resumed ingest remembers its announced size

    async def _unshare(self, copy_existing: bool) -> None:
        """Turn a shared writer into a real ingest, as when the client writes anyway."""
        size, self.shared_size = self.shared_size, None
        await self.service.db.write(lambda c: c.execute(
            "UPDATE ingests SET expected='' WHERE namespace=? AND ref=?",
            (self.namespace, self.ref)))
        await self._open_backend(self.total)
        await self._backend.truncate()
        if copy_existing and size:
            async for chunk in self.service.store.read(self.expected, 0, size):
                await self._backend.write(chunk)

    async def status(self) -> Status:
        if self._backend is None:
            size = self.shared_size or 0
            return Status(self.ref, size, size, self.expected, self.started_at, self.started_at)
        st = await self._backend.status()
        return Status(self.ref, st.offset, st.total, self.expected, st.started_at,
                      st.updated_at)

    @property
    def offset(self) -> int:
        return self._backend.offset if self._backend is not None else (self.shared_size or 0)

    async def digest(self) -> str:
        if self._backend is None:
            return self.expected
        return await self._backend.digest()

    def set_total(self, total: int) -> None:
        self.total = total
        if self._backend is not None:
            self._backend.set_total(total)

    async def write(self, data: bytes) -> int:
        if not data:
            return self.offset
        if self._backend is None:
            await self._unshare(copy_existing=True)
        return await self._backend.write(data)

    async def truncate(self) -> None:
        if self._backend is None:
            await self._unshare(copy_existing=False)
        else:
            await self._backend.truncate()

    async def commit(self, size: int = 0, expected: str = "",
                     labels: Mapping[str, str] | None = None) -> Info:
        """Verify and record the blob; AlreadyExists if the namespace already had it."""
        labels = dict(labels or {})
        labelutil.validate(labels, "content.Labels")
        if expected:
            _check_digest(expected)
        service = self.service
        async with service.sweep_lock.shared():
            if self._backend is None:
                actual_size = self.shared_size or 0
                if size and size != actual_size:
                    raise FailedPrecondition(
                        f"{self.ref!r} failed size validation: {actual_size} != {size}")
                if expected and expected != self.expected:
                    raise FailedPrecondition(f"{self.ref!r} unexpected digest")
                actual = self.expected
                restored = False
                # The blob must still be there: the sweep lock keeps it from here on.
                if not await asyncio.to_thread(service.store.exists, actual):
                    raise NotFound(f"content digest {actual}: not found")
            else:
                if size and size != self._backend.offset:
                    raise FailedPrecondition(
                        f"{self.ref!r} failed size validation: {self._backend.offset} != {size}")
                actual_size = self._backend.offset
                try:
                    actual = await self._backend.commit(size, expected)
                    # The file was not there: if the namespace has a record anyway, its
                    # blob had been quarantined as corrupt and is restored now.
                    restored = True
                except AlreadyExists:
                    actual = await self._backend.digest()
                    restored = False
            now = time.time_ns()

            def tx(conn: sqlite3.Connection) -> bool:
                ensure(conn, self.namespace)
                created = conn.execute(
                    "INSERT OR IGNORE INTO content(namespace, digest, size, labels, created_at, "
                    "updated_at) VALUES (?, ?, ?, ?, ?, ?)",
                    (self.namespace, actual, actual_size, labelutil.dumps(labels), now, now)
                ).rowcount == 1
                if not created and restored:
                    conn.execute("UPDATE content SET size=?, updated_at=? WHERE namespace=? "
                                 "AND digest=?", (actual_size, now, self.namespace, actual))
                    created = True
                conn.execute("DELETE FROM ingests WHERE namespace=? AND ref=?",
                             (self.namespace, self.ref))
                conn.execute("DELETE FROM lease_resources WHERE namespace=? AND "
                             "type='ingests' AND id=?", (self.namespace, self.ref))
                if self.lease:
                    attach(conn, self.namespace, self.lease, "content", actual)
                return created

            created = await service.db.write(tx)
        log.debug("content committed", namespace=self.namespace, ref=self.ref, digest=actual,
                  size=actual_size)
        if not created:
            raise AlreadyExists(f"content {actual}: already exists")
        return Info(actual, actual_size, labels, now, now)

    async def close(self) -> None:
        try:
            if self._backend is not None:
                await self._backend.close()
        finally:
            self.service._writing.pop((self.namespace, self.ref), None)
