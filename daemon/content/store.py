"""The content-addressed blob store on disk, shared by every namespace.

Layout under the plugin root::

    blobs/<algorithm>/<hex>          committed blobs, read-only, named by their digest
    ingest/<sha256 of ref>/          one folder per open ingest:
        data                         the bytes received so far
        ref                          the ingest's ref, to list ingests back
        startedat, updatedat         nanoseconds since the epoch, as text
        total                        the size announced by the writer (0: unknown)
    quarantine/<algorithm>-<hex>     blobs found corrupt, moved aside (see below)

Ingest folders are named after a hash of the ref, so a ref such as ``../../etc`` never
reaches a path. A blob becomes visible only by ``rename`` of a fully written,
fsynced ingest whose size and digest were checked, so a crash at any point leaves
either no blob or a correct one; a half-written ingest just resumes where it stopped.

Tampering: a blob is not re-hashed on every Info, which would cost a full read per
call. Instead (1) every Info and Read compares the file's size with its name's
record (a cheap stat), (2) a Read that covers a whole blob hashes it while streaming
and holds back its last chunk until the digest checks out. A blob caught either way
raises DataLoss and is moved to ``quarantine/``, so it is never served again as valid
and a fresh ingest of the same digest can restore it. Ranged reads of a blob whose
size still matches are served without a hash check.
"""
from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import structlog

from ctrd.errors import (AlreadyExists, DataLoss, FailedPrecondition, InvalidArgument,
                         NotFound, OutOfRange, Unavailable)
from ctrd.oci import digest as digests

log = structlog.get_logger()

READ_CHUNK = 1 << 20
# `ctr content get` asks for 32 KiB per Read call; ranges this small are read inline.
INLINE_READ = 256 << 10
MAX_REF_BYTES = 4096


@dataclass
class BlobInfo:
    digest: str
    size: int
    created_at: int
    updated_at: int


@dataclass
class IngestStatus:
    ref: str
    offset: int
    total: int
    started_at: int
    updated_at: int


def validate_ref(ref: str) -> None:
    """Refs are free-form, but NUL and oversized refs are refused outright."""
    if not ref:
        raise InvalidArgument("ref must not be empty")
    if "\x00" in ref:
        raise InvalidArgument("ref must not contain NUL characters")
    if len(ref.encode("utf-8", "surrogatepass")) > MAX_REF_BYTES:
        raise InvalidArgument(f"ref is longer than {MAX_REF_BYTES} bytes")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _read_int(path: Path) -> int:
    try:
        return int(path.read_text().strip() or 0)
    except (OSError, ValueError):
        return 0


class ContentStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.blobs = root / "blobs"
        self.ingests = root / "ingest"
        self.quarantine = root / "quarantine"
        # Refs with an open writer in this process; the lock is in memory on purpose:
        # a daemon restart must free every ref, not leave stale lock files behind.
        self._locked: dict[str, int] = {}

    def open(self) -> None:
        for folder in (self.blobs, self.ingests, self.quarantine):
            folder.mkdir(parents=True, exist_ok=True, mode=0o700)

    # ------------------------------------------------------------------ blobs

    def blob_path(self, digest: str) -> Path:
        parsed = digests.Digest.parse(digest)
        return self.blobs / parsed.algorithm / parsed.hex

    def exists(self, digest: str) -> bool:
        return self.blob_path(digest).is_file()

    async def info(self, digest: str, expected_size: int | None = None) -> BlobInfo:
        """The blob's size and times; DataLoss if its size is not ``expected_size``."""
        path = self.blob_path(digest)
        st = await asyncio.to_thread(_stat, path)
        if st is None:
            raise NotFound(f"content digest {digest}: not found")
        if expected_size is not None and st.st_size != expected_size:
            await self._quarantine(digest, f"size {st.st_size} != recorded {expected_size}")
        return BlobInfo(digest, st.st_size, st.st_mtime_ns, st.st_mtime_ns)

    async def delete(self, digest: str) -> None:
        try:
            await asyncio.to_thread(os.unlink, self.blob_path(digest))
        except FileNotFoundError:
            raise NotFound(f"content digest {digest}: not found") from None

    def list_blobs(self) -> list[str]:
        """Every committed digest on disk (blocking; call from a thread)."""
        found = []
        for algorithm in digests.ALGORITHMS:
            folder = self.blobs / algorithm
            if folder.is_dir():
                found += [f"{algorithm}:{entry.name}" for entry in os.scandir(folder)
                          if digests.is_valid(f"{algorithm}:{entry.name}")]
        return found

    async def read(self, digest: str, offset: int = 0, size: int = 0,
                   expected_size: int | None = None) -> AsyncIterator[bytes]:
        """Stream ``size`` bytes (0: to the end) from ``offset``, in 1 MiB chunks.

        Opening, checking and the first read happen in one trip to a worker thread:
        clients such as `ctr content get` issue one Read per MiB, so each hop counts.
        """
        if offset < 0 or size < 0:
            raise InvalidArgument("offset and size must not be negative")
        path = self.blob_path(digest)
        hasher = digests.Digest.parse(digest).hasher() if offset == 0 else None
        if 0 < size <= INLINE_READ:
            # Small ranged reads from the page cache take microseconds: a thread hop
            # would cost more than the read itself.
            fd, blob_size, end, chunk = _open_and_read(path, offset, size, hasher)
        else:
            fd, blob_size, end, chunk = await asyncio.to_thread(
                _open_and_read, path, offset, size, hasher)
        try:
            if fd < 0:
                raise NotFound(f"content digest {digest}: not found")
            if expected_size is not None and blob_size != expected_size:
                await self._quarantine(digest, f"size {blob_size} != recorded {expected_size}")
            if offset > blob_size:
                raise OutOfRange(f"read past object length {blob_size} bytes")
            if end != blob_size:
                hasher = None  # a partial read cannot be checked against the digest
            position = offset + len(chunk)
            held = chunk
            while position < end:
                chunk = await asyncio.to_thread(_pread_hash, fd, min(READ_CHUNK, end - position),
                                                position, hasher)
                if not chunk:
                    raise DataLoss(f"content digest {digest}: blob shrank while being read")
                position += len(chunk)
                yield held
                held = chunk
            if hasher is not None and f"{hasher.name}:{hasher.hexdigest()}" != digest:
                await self._quarantine(digest, "content does not match its digest")
            if held:
                yield held
        finally:
            if fd >= 0:
                os.close(fd)

    async def read_small(self, digest: str, offset: int, size: int,
                         expected_size: int | None = None) -> bytes:
        """``size`` bytes (at most :data:`INLINE_READ`) from ``offset``, in one piece.

        The checks of :meth:`read`, without its thread hop or async generator: this is
        the path of `ctr content get`, one Read call per 32 KiB, where each call's fixed
        cost decides the throughput. It awaits nothing unless a check fails."""
        if offset < 0 or not 0 < size <= INLINE_READ:
            raise InvalidArgument(f"small reads take 1 to {INLINE_READ} bytes from offset >= 0")
        parsed = digests.Digest.parse(digest)
        path = os.path.join(self.blobs, parsed.algorithm, parsed.hex)
        hasher = parsed.hasher() if offset == 0 else None
        fd, blob_size, end, chunk = _open_and_read(path, offset, size, hasher)
        if fd < 0:
            raise NotFound(f"content digest {digest}: not found")
        os.close(fd)
        if expected_size is not None and blob_size != expected_size:
            await self._quarantine(digest, f"size {blob_size} != recorded {expected_size}")
        if offset > blob_size:
            raise OutOfRange(f"read past object length {blob_size} bytes")
        if offset + len(chunk) != end:
            raise DataLoss(f"content digest {digest}: blob shrank while being read")
        if hasher is not None and end == blob_size \
                and f"{hasher.name}:{hasher.hexdigest()}" != digest:
            await self._quarantine(digest, "content does not match its digest")
        return chunk

    async def _quarantine(self, digest: str, why: str) -> None:
        parsed = digests.Digest.parse(digest)
        target = self.quarantine / f"{parsed.algorithm}-{parsed.hex}"
        try:
            await asyncio.to_thread(os.replace, self.blob_path(digest), target)
        except FileNotFoundError:
            pass
        log.error("corrupt blob quarantined", digest=digest, reason=why, moved_to=str(target))
        raise DataLoss(f"content digest {digest}: blob is corrupt ({why}); it was quarantined")

    # ---------------------------------------------------------------- ingests

    def _ingest_dir(self, ref: str) -> Path:
        return self.ingests / hashlib.sha256(ref.encode("utf-8", "surrogatepass")).hexdigest()

    async def writer(self, ref: str, total: int = 0, expected: str = "") -> "IngestWriter":
        """Open (or resume) the ingest ``ref``; one writer per ref at a time."""
        validate_ref(ref)
        if total < 0:
            raise InvalidArgument("total must not be negative")
        if ref in self._locked:
            since = self._locked[ref]
            raise Unavailable(f"ref {ref} locked for {(time.time_ns() - since) / 1e9:.2f}s "
                              f"(since {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(since / 1e9))}): "
                              "unavailable")
        self._locked[ref] = time.time_ns()
        try:
            algorithm = digests.Digest.parse(expected).algorithm if expected else digests.CANONICAL
            writer = IngestWriter(self, ref, self._ingest_dir(ref), algorithm)
            await asyncio.to_thread(writer._open, total)
        except BaseException:
            self._locked.pop(ref, None)
            raise
        return writer

    def _unlock(self, ref: str) -> None:
        self._locked.pop(ref, None)

    def locked(self, ref: str) -> bool:
        return ref in self._locked

    async def status(self, ref: str) -> IngestStatus:
        validate_ref(ref)
        status = await asyncio.to_thread(self._status, self._ingest_dir(ref))
        if status is None or status.ref != ref:
            raise NotFound(f"ingest ref {ref!r}: not found")
        return status

    def _status(self, folder: Path) -> IngestStatus | None:
        try:
            ref = (folder / "ref").read_text()
            st = (folder / "data").stat()
        except (FileNotFoundError, NotADirectoryError):
            return None
        return IngestStatus(ref, st.st_size, _read_int(folder / "total"),
                            _read_int(folder / "startedat"), st.st_mtime_ns)

    async def list_statuses(self) -> list[IngestStatus]:
        def scan() -> list[IngestStatus]:
            found = []
            for entry in os.scandir(self.ingests):
                status = self._status(Path(entry.path))
                if status is not None:
                    found.append(status)
            return found

        return await asyncio.to_thread(scan)

    async def abort(self, ref: str) -> None:
        validate_ref(ref)
        if ref in self._locked:
            raise Unavailable(f"ref {ref} is being written: unavailable")
        folder = self._ingest_dir(ref)
        if not await asyncio.to_thread(folder.is_dir):
            raise NotFound(f"ingest ref {ref!r}: not found")
        await asyncio.to_thread(shutil.rmtree, folder, True)

    def orphan_ingests(self, keep: set[str]) -> list[tuple[Path, str | None]]:
        """Ingest folders whose ref is not in ``keep`` and not being written (blocking).

        Folders without a readable ref younger than a minute are left alone: a writer
        may be creating one right now."""
        found: list[tuple[Path, str | None]] = []
        for entry in os.scandir(self.ingests):
            folder = Path(entry.path)
            status = self._status(folder)
            ref = status.ref if status else None
            if ref is not None and (ref in keep or ref in self._locked):
                continue
            try:
                if ref is None and time.time() - entry.stat().st_mtime < 60:
                    continue
            except FileNotFoundError:
                continue  # renamed into place or removed meanwhile
            found.append((folder, ref))
        return found

    def remove_ingests(self, candidates: list[tuple[Path, str | None]],
                       keep: set[str]) -> list[str]:
        """Remove the candidates of :meth:`orphan_ingests` still unwanted (blocking)."""
        removed = []
        for folder, ref in candidates:
            if ref is not None and (ref in keep or ref in self._locked):
                continue
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(ref or folder.name)
        return removed

def _stat(path: Path) -> os.stat_result | None:
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st


def _open_and_read(path: Path | str, offset: int, size: int,
                   hasher) -> tuple[int, int, int, bytes]:
    """(fd, blob size, end of the range, first chunk); fd is -1 if there is no blob."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return -1, 0, 0, b""
    try:
        blob_size = os.fstat(fd).st_size
        end = blob_size if size == 0 else min(blob_size, offset + size)
        if offset >= end:
            return fd, blob_size, end, b""
        if end != blob_size:
            hasher = None
        return fd, blob_size, end, _pread_hash(fd, min(READ_CHUNK, end - offset), offset, hasher)
    except BaseException:
        os.close(fd)
        raise


def _pread_hash(fd: int, length: int, offset: int, hasher) -> bytes:
    data = os.pread(fd, length, offset)
    if hasher is not None:
        hasher.update(data)
    return data


class IngestWriter:
    """One open ingest. ``write`` pipelines: the chunk just received is written and
    hashed on a worker thread while the next one arrives, so the event loop never waits
    on disk and there is at most one chunk in flight."""

    def __init__(self, store: ContentStore, ref: str, folder: Path, algorithm: str) -> None:
        self.store = store
        self.ref = ref
        self.folder = folder
        self.algorithm = algorithm
        self.total = 0
        self.started_at = 0
        self.offset = 0  # bytes accepted, including the chunk in flight
        self._hasher = hashlib.new(algorithm)
        self._fd = -1
        self._pending: asyncio.Future | None = None
        self._closed = False

    # Blocking parts, run on worker threads.

    def _open(self, total: int) -> None:
        fresh = not (self.folder / "ref").is_file()
        if fresh:
            shutil.rmtree(self.folder, ignore_errors=True)  # a torn creation
            tmp = self.folder.with_name(self.folder.name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(mode=0o700)
            now = str(time.time_ns())
            (tmp / "ref").write_text(self.ref)
            (tmp / "startedat").write_text(now)
            (tmp / "updatedat").write_text(now)
            (tmp / "total").write_text(str(total))
            (tmp / "data").touch(mode=0o600)
            os.rename(tmp, self.folder)
        elif total:
            (self.folder / "total").write_text(str(total))
        self.total = total or _read_int(self.folder / "total")
        self.started_at = _read_int(self.folder / "startedat")
        self._fd = os.open(self.folder / "data", os.O_RDWR | os.O_CLOEXEC)
        # Resuming: the digest state is not saved, so hash what is already there.
        while chunk := os.read(self._fd, READ_CHUNK):
            self._hasher.update(chunk)
            self.offset += len(chunk)

    def _write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            written = os.write(self._fd, view)
            view = view[written:]
        self._hasher.update(data)

    def _truncate(self) -> None:
        os.ftruncate(self._fd, 0)
        os.lseek(self._fd, 0, os.SEEK_SET)
        self._hasher = hashlib.new(self.algorithm)

    # Async interface.

    async def flush(self) -> None:
        """Wait for the chunk in flight; re-raise its failure if it had one."""
        pending, self._pending = self._pending, None
        if pending is not None:
            try:
                await pending
            except BaseException:
                self._closed = True  # the file no longer matches offset/hasher
                raise

    async def write(self, data: bytes) -> int:
        if self._closed:
            raise FailedPrecondition(f"ingest {self.ref}: writer is closed")
        if self.total and self.offset + len(data) > self.total:
            raise FailedPrecondition(
                f"write of {len(data)} bytes at offset {self.offset} exceeds the expected "
                f"total of {self.total} bytes")
        await self.flush()
        self._pending = asyncio.get_running_loop().run_in_executor(None, self._write, data)
        self.offset += len(data)
        return self.offset

    async def truncate(self) -> None:
        await self.flush()
        await asyncio.to_thread(self._truncate)
        self.offset = 0

    async def digest(self) -> str:
        await self.flush()
        return f"{self.algorithm}:{self._hasher.copy().hexdigest()}"

    async def status(self) -> IngestStatus:
        await self.flush()
        st = await asyncio.to_thread(os.fstat, self._fd)
        return IngestStatus(self.ref, self.offset, self.total, self.started_at, st.st_mtime_ns)

    def set_total(self, total: int) -> None:
        self.total = total

    async def commit(self, size: int = 0, expected: str = "") -> str:
        """Verify size and digest, then make the blob visible; returns its digest.

        FailedPrecondition leaves the ingest as it was (the data is still there);
        AlreadyExists removes the ingest, the blob being already present.
        """
        await self.flush()
        if expected:
            digests.validate(expected)
        return await asyncio.to_thread(self._commit, size, expected)

    def _commit(self, size: int, expected: str) -> str:
        if size and size != self.offset:
            raise FailedPrecondition(
                f"unexpected commit size {self.offset}, expected {size}")
        actual = f"{self.algorithm}:{self._hasher.copy().hexdigest()}"
        if expected and not expected.startswith(self.algorithm + ":"):
            # The writer hashed with another algorithm than the one asked for now.
            os.lseek(self._fd, 0, os.SEEK_SET)
            with os.fdopen(os.dup(self._fd), "rb") as stream:
                actual = str(digests.of_stream(stream, expected.split(":", 1)[0])[0])
        if expected and expected != actual:
            raise FailedPrecondition(f"unexpected commit digest {actual}, expected {expected}")
        target = self.store.blob_path(actual)
        if target.exists():
            self._discard()
            raise AlreadyExists(f"content {actual}: already exists")
        os.fsync(self._fd)
        os.fchmod(self._fd, 0o444)
        target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.rename(self.folder / "data", target)
        _fsync_dir(target.parent)
        self._discard()
        return actual

    def _discard(self) -> None:
        os.close(self._fd)
        self._fd = -1
        self._closed = True
        shutil.rmtree(self.folder, ignore_errors=True)

    async def close(self) -> None:
        """Release the ref; the ingest stays on disk to be resumed unless committed."""
        try:
            if self._pending is not None:
                try:
                    await self._pending
                except Exception:  # noqa: BLE001 - already reported to the writer's caller
                    pass
                self._pending = None
            if self._fd >= 0:
                fd, self._fd = self._fd, -1
                await asyncio.to_thread(self._close_fd, fd)
        finally:
            self._closed = True
            self.store._unlock(self.ref)

    def _close_fd(self, fd: int) -> None:
        os.close(fd)
        try:
            (self.folder / "updatedat").write_text(str(time.time_ns()))
        except FileNotFoundError:
            pass
