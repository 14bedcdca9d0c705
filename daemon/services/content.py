"""containerd.services.content.v1.Content over the namespaced content store.

The Write stream follows containerd's protocol: the first message names the ref (and
may announce ``total`` and ``expected``); every message gets one response carrying the
ingest's offset; STAT reports progress so that a client can resume where an earlier
stream (or an earlier daemon) stopped; COMMIT verifies and publishes the blob.
Responses to WRITE carry no running digest (clients only keep a non-empty one), so the
bytes just received can be hashed and written while the next message arrives.
"""
from __future__ import annotations

from collections.abc import AsyncIterator

from google.protobuf import empty_pb2

from ctrd.api.containerd.services.content.v1 import content_pb2 as pb
from ctrd.errors import AlreadyExists, CtrdError, InvalidArgument, NotFound, OutOfRange
from ctrd.oci import digest as digests
from ctrd.protoutil import timestamp

from ..content.store import INLINE_READ
from ..metadata.content import ContentService, Info, Status
from ..plugin import SERVICE, InitContext
from .context import lease, namespace
from .interceptor import Registrar

LIST_BLOCK = 100


def _info_pb(info: Info, with_updated: bool = True) -> pb.Info:
    msg = pb.Info(digest=info.digest, size=info.size, labels=info.labels,
                  created_at=timestamp(info.created_at))
    if with_updated:
        msg.updated_at.CopyFrom(timestamp(info.updated_at))
    return msg


def _status_pb(status: Status) -> pb.Status:
    return pb.Status(ref=status.ref, offset=status.offset, total=status.total,
                     expected=status.expected, started_at=timestamp(status.started_at),
                     updated_at=timestamp(status.updated_at))


def _valid(digest: str) -> str:
    if not digests.is_valid(digest):
        raise InvalidArgument(f"{digest!r} failed validation")
    return digest


class ContentGrpc:
    def __init__(self, content: ContentService) -> None:
        self.content = content

    def register(self, server: Registrar) -> None:
        server.add_service(pb.DESCRIPTOR.services_by_name["Content"], self)

    async def Info(self, request: pb.InfoRequest, context) -> pb.InfoResponse:
        info = await self.content.info(namespace(context), _valid(request.digest))
        return pb.InfoResponse(info=_info_pb(info))

    async def Update(self, request: pb.UpdateRequest, context) -> pb.UpdateResponse:
        paths = list(request.update_mask.paths) if request.HasField("update_mask") else []
        info = await self.content.update(namespace(context), _valid(request.info.digest),
                                         dict(request.info.labels), paths)
        return pb.UpdateResponse(info=_info_pb(info))

    async def List(self, request: pb.ListContentRequest,
                   context) -> AsyncIterator[pb.ListContentResponse]:
        infos = await self.content.list(namespace(context), list(request.filters))
        for start in range(0, len(infos), LIST_BLOCK):
            # containerd's List leaves updated_at out; clients show created_at only.
            yield pb.ListContentResponse(
                info=[_info_pb(i, with_updated=False) for i in infos[start:start + LIST_BLOCK]])

    async def Delete(self, request: pb.DeleteContentRequest, context) -> empty_pb2.Empty:
        await self.content.delete(namespace(context), _valid(request.digest), lease(context))
        return empty_pb2.Empty()

    async def Read(self, request: pb.ReadContentRequest, context) -> None:
        # Written against context.write() rather than as an async generator: one fewer
        # layer of generators per call, and a client that hangs up early (containerd's
        # remote reader cancels each call once it has its bytes) leaves no suspended
        # generator behind to be finalised by a task of its own.
        offset = max(request.offset, 0)
        size = max(request.size, 0)
        ns, digest = namespace(context), _valid(request.digest)
        if 0 < size <= INLINE_READ:
            # `ctr content get` reads 32 KiB per call: one message, read inline.
            data = await self.content.read_small(ns, digest, offset, size)
            if data:
                await context.write(pb.ReadContentResponse(offset=offset, data=data))
            return
        async for chunk in await self.content.read(ns, digest, offset, size):
            await context.write(pb.ReadContentResponse(offset=offset, data=chunk))
            offset += len(chunk)

    async def Status(self, request: pb.StatusRequest, context) -> pb.StatusResponse:
        try:
            status = await self.content.status(namespace(context), request.ref)
        except CtrdError as exc:
            raise type(exc)(f'could not get status for ref "{request.ref}": {exc}') from None
        return pb.StatusResponse(status=_status_pb(status))

    async def ListStatuses(self, request: pb.ListStatusesRequest,
                           context) -> pb.ListStatusesResponse:
        statuses = await self.content.list_statuses(namespace(context), list(request.filters))
        return pb.ListStatusesResponse(statuses=[_status_pb(s) for s in statuses])

    async def Abort(self, request: pb.AbortRequest, context) -> empty_pb2.Empty:
        await self.content.abort(namespace(context), request.ref, lease(context))
        return empty_pb2.Empty()

    async def Write(self, requests: AsyncIterator[pb.WriteContentRequest],
                    context) -> AsyncIterator[pb.WriteContentResponse]:
        ns = namespace(context)
        stream = aiter(requests)
        try:
            req = await anext(stream)
        except StopAsyncIteration:
            return
        ref = req.ref
        if not ref:
            raise InvalidArgument("first message must have a reference")
        total, expected = req.total, req.expected
        writer = await self.content.writer(ns, ref, total, expected, lease(context))
        try:
            while True:
                resp = pb.WriteContentResponse(action=req.action)
                if req.expected:
                    expected = req.expected
                    if await self._has(ns, expected):
                        await writer.close()
                        try:
                            await self.content.abort(ns, ref)
                        except NotFound:
                            pass
                        raise AlreadyExists(f"blob with expected digest {expected} exists")
                if req.total > 0:
                    total = req.total
                    writer.set_total(total)
                if req.action == pb.STAT:
                    status = await writer.status()
                    resp.offset = status.offset
                    resp.total = total
                    resp.digest = await writer.digest()
                    resp.started_at.CopyFrom(timestamp(status.started_at))
                    resp.updated_at.CopyFrom(timestamp(status.updated_at))
                elif req.action in (pb.WRITE, pb.COMMIT):
                    offset = writer.offset
                    if req.offset > 0 and req.offset != offset:
                        raise OutOfRange(
                            f"write @{req.offset} must occur at current offset {offset}")
                    if req.offset == 0 and offset > 0:
                        await writer.truncate()
                        offset = 0
                    data = req.data  # each access of a bytes field copies it
                    if data:
                        offset = await writer.write(data)
                    resp.offset = offset
                    if req.action == pb.COMMIT:
                        info = await writer.commit(total, expected, dict(req.labels))
                        resp.digest = info.digest
                else:
                    raise InvalidArgument(f"unknown write action {req.action}")
                yield resp
                if req.action == pb.COMMIT:
                    return
                try:
                    req = await anext(stream)
                except StopAsyncIteration:
                    return
        finally:
            await writer.close()

    async def _has(self, ns: str, digest: str) -> bool:
        try:
            await self.content.info(ns, digest)
        except NotFound:
            return False
        return True


def init(ctx: InitContext) -> ContentGrpc:
    return ContentGrpc(ctx.get(SERVICE, "content-service"))
