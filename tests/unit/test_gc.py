"""Garbage collection: containerd's roots and references, and crash consistency."""
from __future__ import annotations

import hashlib
import json
import sqlite3
import time
from pathlib import Path

import pytest

from ctrd.daemon.content.store import ContentStore
from ctrd.daemon.gc import collector
from ctrd.daemon.gc.scheduler import Scheduler
from ctrd.daemon.metadata.content import ContentService
from ctrd.daemon.metadata.db import Database
from ctrd.daemon.metadata.leases import LeaseStore


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


class FakeRegistry:
    def __init__(self, services: dict | None = None) -> None:
        self.services = services or {}

    def get_all(self, type_: str) -> dict:
        return self.services if type_.endswith("service.v1") else {}


@pytest.fixture
async def env(tmp_path: Path):
    db = Database(tmp_path / "meta.db")
    await db.open()
    store = ContentStore(tmp_path / "content")
    store.open()
    content = ContentService(db, store)
    gc = Scheduler(db, content, FakeRegistry())
    yield db, content, gc
    await gc.aclose()
    await db.close()


def rows(conn: sqlite3.Connection, sql: str) -> set:
    return {tuple(r) for r in conn.execute(sql)}


async def put(content: ContentService, data: bytes, labels: dict | None = None,
              ns: str = "ns", lease: str | None = None) -> str:
    await content.write_blob(ns, data, sha(data), labels or {}, lease=lease)
    return sha(data)


async def listed(content: ContentService, ns: str = "ns") -> set[str]:
    return {i.digest for i in await content.list(ns)}


async def test_unreferenced_content_goes_roots_and_refs_stay(env) -> None:
    db, content, gc = env
    leaf = await put(content, b"leaf")
    mid = await put(content, b"mid", {"containerd.io/gc.ref.content.m": leaf})
    await put(content, b"root", {"containerd.io/gc.root": "", "containerd.io/gc.ref.content": mid})
    junk = await put(content, b"junk")
    image_target = await put(content, b"manifest")
    await db.write(lambda c: c.execute(
        "INSERT INTO images VALUES ('ns', 'img', 'application/x', ?, 8, '{}', '{}', 0, 0)",
        (image_target,)))
    report = await gc.collect()
    assert report.content == [("ns", junk)]
    assert report.blobs == [junk]
    assert await listed(content) == {leaf, mid, sha(b"root"), image_target}
    assert not content.store.exists(junk)


async def test_same_blob_in_two_namespaces(env) -> None:
    db, content, gc = env
    kept = await put(content, b"shared", {"containerd.io/gc.root": "1"}, ns="a")
    await put(content, b"shared", ns="b")
    report = await gc.collect()
    assert report.content == [("b", kept)]
    assert report.blobs == []  # namespace a still holds the file
    assert content.store.exists(kept)


async def test_leases_protect_until_deleted_or_expired(env) -> None:
    db, content, gc = env
    leases = LeaseStore(db)
    await leases.create("ns", "keep", {})
    past = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - 60))
    await leases.create("ns", "old", {"containerd.io/gc.expire": past})
    kept = await put(content, b"kept", lease="keep")
    expired = await put(content, b"expired", lease="old")
    w = await content.writer("ns", "open-ingest", lease="keep")
    await w.write(b"half")
    await w.close()
    report = await gc.collect()
    assert report.leases == [("ns", "old")]
    assert await listed(content) == {kept}
    assert not content.store.exists(expired)
    assert (await content.status("ns", "open-ingest")).offset == 4
    await leases.delete("ns", "keep")
    await gc.collect()
    assert await listed(content) == set()
    assert await content.list_statuses("ns") == []
    assert list((content.store.root / "ingest").iterdir()) == []


async def test_flat_lease_does_not_follow_labels(env) -> None:
    db, content, gc = env
    leases = LeaseStore(db)
    await leases.create("ns", "flat", {"containerd.io/gc.flat": "1"})
    child = await put(content, b"child")
    await put(content, b"parent", {"containerd.io/gc.ref.content.x": child}, lease="flat")
    await gc.collect()
    assert await listed(content) == {sha(b"parent")}


async def test_ingest_expiry(env) -> None:
    db, content, gc = env
    w = await content.writer("ns", "fresh")
    await w.write(b"x")
    await w.close()
    w = await content.writer("ns", "stale")
    await w.write(b"y")
    await w.close()
    await db.write(lambda c: c.execute("UPDATE ingests SET expires_at=1 WHERE ref='stale'"))
    report = await gc.collect()
    assert report.ingests == [("ns", "stale")]
    assert [s.ref for s in await content.list_statuses("ns")] == ["fresh"]
    assert len(report.backend_ingests) == 1


def test_snapshot_references(tmp_path: Path) -> None:
    conn = sqlite3.connect(":memory:")
    conn.row_factory = sqlite3.Row
    from ctrd.daemon.metadata.db import _statements
    from ctrd.daemon.metadata.schema import MIGRATIONS
    for statement in _statements(MIGRATIONS[0]):
        conn.execute(statement)
    conn.execute("INSERT INTO namespaces VALUES ('ns', '{}', 0)")

    def snap(key: str, parent: str = "", labels: dict | None = None) -> None:
        conn.execute("INSERT INTO snapshots VALUES ('ns', 'overlayfs', ?, ?, ?, 1, ?, 0, 0)",
                     (key, "b-" + key, parent, json.dumps(labels or {})))

    snap("base")
    snap("layer", "base")
    snap("other")
    snap("orphan-parent")
    snap("orphan", "orphan-parent")
    snap("by-label")
    conn.execute("INSERT INTO containers(namespace, id, runtime_name, snapshotter, snapshot_key, "
                 "labels, created_at, updated_at) VALUES ('ns', 'c1', 'r', 'overlayfs', "
                 "'layer', ?, 0, 0)",
                 (json.dumps({"containerd.io/gc.ref.snapshot.overlayfs/extra": "by-label"}),))
    conn.execute("INSERT INTO content VALUES ('ns', ?, 1, ?, 0, 0)",
                 (sha(b"c"), json.dumps({"containerd.io/gc.root": "1",
                                         "containerd.io/gc.ref.snapshot.overlayfs": "other"})))
    report = collector.sweep_rows(conn)
    assert sorted(k for _, _, k in report.snapshots) == ["orphan", "orphan-parent"]
    assert report.snapshotters == {"overlayfs"}
    assert rows(conn, "SELECT key FROM snapshots") == {("base",), ("layer",), ("other",),
                                                       ("by-label",)}


async def test_snapshotter_cleanup_hook_is_called(env) -> None:
    db, content, _ = env
    called: list[str] = []

    class Snapshots:
        async def cleanup_orphans(self, name: str) -> None:
            called.append(name)

    gc = Scheduler(db, content, FakeRegistry({"snapshots-service": Snapshots()}))
    await db.write(lambda c: (
        c.execute("INSERT OR IGNORE INTO namespaces VALUES ('ns', '{}', 0)"),
        c.execute("INSERT INTO snapshots VALUES ('ns', 'native', 'k', 'b', '', 1, '{}', 0, 0)")))
    await gc.collect()
    assert called == ["native"]


async def test_crash_between_rows_and_files_is_repaired(env) -> None:
    db, content, gc = env
    junk = await put(content, b"junk")
    # Only the row sweep happens, as if the daemon died before removing files.
    await db.write(collector.sweep_rows)
    assert content.store.exists(junk)
    assert await listed(content) == set()
    report = await gc.collect()
    assert report.blobs == [junk]


async def test_collection_never_races_a_commit(env) -> None:
    db, content, gc = env
    import asyncio
    data = [bytes([i]) * 100_000 for i in range(20)]
    leases = LeaseStore(db)
    await leases.create("ns", "L", {})

    async def writes() -> None:
        for d in data:
            await content.write_blob("ns", d, sha(d), lease="L")

    async def collections() -> None:
        for _ in range(20):
            await gc.collect()
            await asyncio.sleep(0)

    await asyncio.gather(writes(), collections())
    await gc.collect()
    assert await listed(content) == {sha(d) for d in data}
    assert all(content.store.exists(sha(d)) for d in data)


async def test_debounced_background_run(env) -> None:
    db, content, gc = env
    import asyncio
    gc.delay = 0.05
    for i in range(3):
        await put(content, bytes([i]))
        await content.delete("ns", sha(bytes([i])))
        gc.mark_dirty()
    deadline = time.monotonic() + 10
    while (content.store.list_blobs() or gc.last is None) and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    assert content.store.list_blobs() == []
    assert gc.last is not None
