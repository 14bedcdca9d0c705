"""containerd.services.content.v1: the content-addressed blob store."""
from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field

import grpc
from google.protobuf import field_mask_pb2

from ctrd import errors
from ctrd.api.containerd.services.content.v1 import content_pb2 as pb
from ctrd.api.containerd.services.content.v1 import content_pb2_grpc as pb_grpc

from .connection import Connection, translate
from .types import nanos

CHUNK = 1 << 20


@dataclass(frozen=True)
class ContentInfo:
    digest: str
    size: int
    created_at: int = 0
    updated_at: int = 0
    labels: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_pb(cls, msg: pb.Info) -> ContentInfo:
        return cls(msg.digest, msg.size, nanos(msg.created_at), nanos(msg.updated_at),
                   dict(msg.labels))


class Content:
    def __init__(self, conn: Connection) -> None:
        self._conn = conn
        self._stub = pb_grpc.ContentStub(conn.channel)

    async def info(self, digest: str) -> ContentInfo:
        resp = await self._conn.unary(self._stub.Info, pb.InfoRequest(digest=digest))
        return ContentInfo.from_pb(resp.info)

    async def exists(self, digest: str) -> bool:
        try:
            await self.info(digest)
        except errors.NotFound:
            return False
        return True

    async def list(self, filters: list[str] | None = None) -> list[ContentInfo]:
        out: list[ContentInfo] = []
        async for resp in self._conn.stream(self._stub.List,
                                            pb.ListContentRequest(filters=filters or [])):
            out.extend(ContentInfo.from_pb(i) for i in resp.info)
        return out

    async def set_labels(self, digest: str, labels: dict[str, str]) -> ContentInfo:
        """Set the given labels (an empty value removes one), leaving the others."""
        req = pb.UpdateRequest(
            info=pb.Info(digest=digest, labels={k: v for k, v in labels.items() if v}),
            update_mask=field_mask_pb2.FieldMask(paths=[f"labels.{k}" for k in labels]))
        resp = await self._conn.unary(self._stub.Update, req)
        return ContentInfo.from_pb(resp.info)

    async def delete(self, digest: str) -> None:
        await self._conn.unary(self._stub.Delete, pb.DeleteContentRequest(digest=digest))

    async def read_chunks(self, digest: str, offset: int = 0,
                          size: int = 0) -> AsyncIterator[bytes]:
        req = pb.ReadContentRequest(digest=digest, offset=offset, size=size)
        async for resp in self._conn.stream(self._stub.Read, req):
            yield resp.data

    async def read(self, digest: str, *, limit: int = 64 << 20) -> bytes:
        """A whole blob in memory; refuses blobs larger than ``limit`` (manifests and
        configs are small, a hostile one should not exhaust memory)."""
        info = await self.info(digest)
        if info.size > limit:
            raise errors.FailedPrecondition(f"blob {digest} is {info.size} bytes, over {limit}")
        parts = [chunk async for chunk in self.read_chunks(digest)]
        return b"".join(parts)

    async def write(self, ref: str, data: bytes | Iterable[bytes] | AsyncIterator[bytes], *,
                    expected: str = "", total: int = 0,
                    labels: dict[str, str] | None = None) -> str:
        """Write a blob under ingest ``ref`` and commit it; returns its digest.

        A blob that is already stored counts as written (its labels are then set).
        """
        queue: asyncio.Queue[pb.WriteContentRequest | None] = asyncio.Queue(maxsize=1)

        async def requests() -> AsyncIterator[pb.WriteContentRequest]:
            while (item := await queue.get()) is not None:
                yield item

        call = self._stub.Write(requests(), metadata=self._conn.metadata())

        async def send(req: pb.WriteContentRequest) -> pb.WriteContentResponse:
            await queue.put(req)
            resp = await call.read()
            if resp is grpc.aio.EOF:
                raise errors.Unknown(f"content write {ref}: stream ended early")
            return resp

        hasher, offset = hashlib.sha256(), 0
        try:
            try:
                await send(pb.WriteContentRequest(action=pb.STAT, ref=ref, total=total,
                                                  expected=expected))
                # Offset 0 on the first write truncates whatever an interrupted
                # earlier attempt left in this ingest.
                first = True
                async for chunk in _chunks(data):
                    for start in range(0, len(chunk), CHUNK):
                        piece = chunk[start:start + CHUNK]
                        await send(pb.WriteContentRequest(action=pb.WRITE, ref=ref,
                                                          offset=offset, data=piece))
                        offset += len(piece)
                        hasher.update(piece)
                        first = False
                if first:
                    await send(pb.WriteContentRequest(action=pb.WRITE, ref=ref, offset=0))
                digest = expected or f"sha256:{hasher.hexdigest()}"
                resp = await send(pb.WriteContentRequest(action=pb.COMMIT, ref=ref, offset=offset,
                                                         total=offset, expected=digest,
                                                         labels=labels or {}))
                return resp.digest or digest
            except grpc.aio.AioRpcError as exc:
                raise translate(exc, self._conn.address) from None
        except errors.AlreadyExists:
            digest = expected or f"sha256:{hasher.hexdigest()}"
            if labels:
                await self.set_labels(digest, labels)
            return digest
        finally:
            await _finish(queue)
            call.cancel()


async def _finish(queue: asyncio.Queue) -> None:
    # End the request stream without blocking on a consumer that has gone away.
    try:
        queue.put_nowait(None)
    except asyncio.QueueFull:
        pass


async def _chunks(data: bytes | Iterable[bytes] | AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    if isinstance(data, (bytes, bytearray, memoryview)):
        yield bytes(data)
    elif hasattr(data, "__aiter__"):
        async for chunk in data:  # type: ignore[union-attr]
            yield chunk
    else:
        for chunk in data:  # type: ignore[union-attr]
            yield chunk
