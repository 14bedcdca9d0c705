"""The blob store and the namespaced content layer, without gRPC."""
from __future__ import annotations

import asyncio
import hashlib
import os
from pathlib import Path

import pytest

from ctrd.daemon.content.store import ContentStore
from ctrd.daemon.metadata.content import ContentService
from ctrd.daemon.metadata.db import Database
from ctrd.daemon.metadata.leases import LeaseStore
from ctrd.errors import (AlreadyExists, DataLoss, FailedPrecondition, InvalidArgument, NotFound,
                         OutOfRange, Unavailable)


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@pytest.fixture
async def service(tmp_path: Path):
    db = Database(tmp_path / "meta.db")
    await db.open()
    store = ContentStore(tmp_path / "content")
    store.open()
    events: list[tuple[str, str]] = []

    async def publish(ns, topic, msg):
        events.append((ns, topic))

    cs = ContentService(db, store, publish)
    cs.events = events
    yield cs
    await db.close()


async def collect(chunks) -> bytes:
    return b"".join([c async for c in chunks])


async def test_write_blob_roundtrip_and_layout(service: ContentService) -> None:
    data = os.urandom(3 << 20)
    info = await service.write_blob("ns", data, sha(data), {"a": "b"})
    assert (info.size, info.labels) == (len(data), {"a": "b"})
    path = await service.path("ns", sha(data))
    assert path == service.store.root / "blobs" / "sha256" / sha(data)[7:]
    assert path.stat().st_mode & 0o777 == 0o444
    assert await collect(await service.read("ns", sha(data))) == data
    assert await collect(await service.read("ns", sha(data), 5, 10)) == data[5:15]
    assert list((service.store.root / "ingest").iterdir()) == []
    # Writing it again: no error, labels merged.
    again = await service.write_blob("ns", data, sha(data), {"c": "d"})
    assert again.labels == {"a": "b", "c": "d"}


async def test_write_blob_from_async_iterator(service: ContentService) -> None:
    parts = [b"a" * 1000, b"", b"b" * 5000]

    async def gen():
        for p in parts:
            yield p

    info = await service.write_blob("ns", gen(), sha(b"".join(parts)))
    assert info.size == 6000


async def test_wrong_digest_or_size_is_not_committed(service: ContentService) -> None:
    with pytest.raises(FailedPrecondition):
        await service.write_blob("ns", b"abc", sha(b"abd"))
    with pytest.raises(NotFound):
        await service.info("ns", sha(b"abc"))
    assert not service.store.exists(sha(b"abc"))
    w = await service.writer("ns", "r", total=3)
    try:
        with pytest.raises(FailedPrecondition):
            await w.write(b"abcd")
        await w.write(b"ab")
        with pytest.raises(FailedPrecondition):
            await w.commit(size=3)
    finally:
        await w.close()


async def test_namespaces_are_separate(service: ContentService) -> None:
    await service.write_blob("a", b"x", sha(b"x"))
    with pytest.raises(NotFound):
        await service.info("b", sha(b"x"))
    with pytest.raises(NotFound):
        await service.path("b", sha(b"x"))
    await service.delete("a", sha(b"x"))
    assert service.events == [("a", "/content/delete")]
    with pytest.raises(NotFound):
        await service.delete("a", sha(b"x"))


async def test_writer_lock_and_resume(service: ContentService) -> None:
    w = await service.writer("ns", "ref", total=6)
    await w.write(b"abc")
    with pytest.raises(Unavailable, match="locked"):
        await service.writer("ns", "ref")
    # Another namespace has its own ref of the same name.
    other = await service.writer("other", "ref")
    await other.close()
    await w.close()
    w = await service.writer("ns", "ref")
    try:
        assert (await w.status()).offset == 3 and w.total == 6
        await w.write(b"def")
        info = await w.commit(6, sha(b"abcdef"))
        assert info.digest == sha(b"abcdef")
    finally:
        await w.close()
    with pytest.raises(NotFound):
        await service.status("ns", "ref")


async def test_crash_leaves_no_partial_blob(service: ContentService) -> None:
    w = await service.writer("ns", "crash")
    await w.write(b"partial")
    await w.status()  # waits for the chunk in flight
    # Not closed: as if the process died. A new store over the same folder sees the ingest.
    fresh = ContentStore(service.store.root)
    status = await fresh.status(w.store_ref)
    assert status.offset == 7
    assert fresh.list_blobs() == []
    await w.close()


async def test_bad_refs_and_digests(service: ContentService) -> None:
    for ref in ("", "a\x00b", "x" * 5000):
        with pytest.raises(InvalidArgument):
            await service.writer("ns", ref)
    for digest in ("sha256:zz", "md5:" + "0" * 32, "sha256:" + "A" * 64):
        with pytest.raises(InvalidArgument):
            await service.info("ns", digest)
    w = await service.writer("ns", "../../x")
    await w.close()
    names = [p.name for p in (service.store.root / "ingest").iterdir()]
    assert names == [hashlib.sha256(w.store_ref.encode()).hexdigest()]


async def test_read_range_errors(service: ContentService) -> None:
    await service.write_blob("ns", b"0123456789", sha(b"0123456789"))
    with pytest.raises(OutOfRange):
        await collect(await service.read("ns", sha(b"0123456789"), 11))
    assert await collect(await service.read("ns", sha(b"0123456789"), 10)) == b""
    assert await collect(await service.read("ns", sha(b"0123456789"), 8, 100)) == b"89"


async def test_tampered_blob_is_quarantined(service: ContentService) -> None:
    data = os.urandom(50_000)
    await service.write_blob("ns", data, sha(data))
    path = service.store.blob_path(sha(data))
    path.chmod(0o644)
    path.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    # A ranged read is served (no hash over a part), a whole read is checked.
    assert len(await collect(await service.read("ns", sha(data), 0, 100))) == 100
    with pytest.raises(DataLoss, match="corrupt"):
        await collect(await service.read("ns", sha(data)))
    assert not path.exists()
    assert list((service.store.root / "quarantine").iterdir())
    with pytest.raises(NotFound):
        await service.info("ns", sha(data))
    # Writing the right bytes again restores it under the existing record.
    info = await service.write_blob("ns", data, sha(data))
    assert info.size == len(data)
    assert await collect(await service.read("ns", sha(data))) == data


async def test_commit_existing_is_already_exists(service: ContentService) -> None:
    await service.write_blob("ns", b"same", sha(b"same"))
    with pytest.raises(AlreadyExists):
        await service.writer("ns", "r", expected=sha(b"same"))
    w = await service.writer("ns", "r2")
    try:
        await w.write(b"same")
        with pytest.raises(AlreadyExists):
            await w.commit()
    finally:
        await w.close()
    assert await service.list_statuses("ns") == []


async def test_leased_writes_are_attached(service: ContentService) -> None:
    leases = LeaseStore(service.db)
    await leases.create("ns", "L", {})
    await service.write_blob("ns", b"held", sha(b"held"), lease="L")
    w = await service.writer("ns", "open", lease="L")
    await w.close()
    resources = await leases.list_resources("ns", "L")
    assert {(r.type, r.id) for r in resources} == {("content", sha(b"held")),
                                                    ("ingests", "open")}
    with pytest.raises(NotFound):
        await service.write_blob("ns", b"x", sha(b"x"), lease="missing")


async def test_concurrent_commits_of_one_digest(service: ContentService) -> None:
    data = os.urandom(1 << 20)
    results = await asyncio.gather(
        *(service.write_blob("ns", data, sha(data), ref=f"r{i}") for i in range(5)),
        return_exceptions=True)
    assert all(not isinstance(r, Exception) for r in results), results
    assert service.store.list_blobs() == [sha(data)]
