"""Client-opened streams that a later request refers to by id (containerd 1.7's streaming).

A client opens ``Streaming.Stream``, sends ``StreamInit{id}`` and waits for the empty
acknowledgement; the stream is then registered here under (namespace, id) until it is
closed. A transfer request names such streams for progress, credentials and archive
data; the transfer takes the stream, uses it, and closes it when done.
"""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from google.protobuf import any_pb2
from google.protobuf.message import Message

from ctrd import protoutil
from ctrd.api.containerd.types.transfer import streaming_pb2
from ctrd.errors import AlreadyExists, NotFound, Unavailable

from ..rpc.call import Call
from ..rpc.status import EOF, AbortError


class Stream:
    """One registered stream: send and receive protobuf messages packed in Any."""

    def __init__(self, context: Call) -> None:
        self._context = context
        self._closed = asyncio.Event()
        self._send_lock = asyncio.Lock()

    async def send(self, msg: Message) -> None:
        if self._closed.is_set():
            raise Unavailable("stream closed")
        async with self._send_lock:
            await self._context.write(protoutil.pack(msg))

    async def recv(self) -> Message:
        """The next message from the client; EOFError when the client is done sending
        or the stream went away (a read alone would wait forever on a dead call)."""
        if self._closed.is_set():
            raise EOFError("stream closed")
        read = asyncio.ensure_future(self._context.read())
        closed = asyncio.ensure_future(self._closed.wait())
        try:
            await asyncio.wait({read, closed}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            closed.cancel()
        if not read.done():
            read.cancel()
            raise EOFError("stream closed")
        try:
            item = read.result()
        except (AbortError, RuntimeError) as exc:
            raise EOFError(f"stream failed: {exc}") from None
        if item is EOF:
            raise EOFError("stream ended")
        assert isinstance(item, any_pb2.Any)
        return protoutil.unpack(item)

    def close(self) -> None:
        self._closed.set()

    async def wait_closed(self) -> None:
        await self._closed.wait()


class StreamManager:
    def __init__(self) -> None:
        self._streams: dict[tuple[str, str], Stream] = {}

    def register(self, namespace: str, stream_id: str, stream: Stream) -> None:
        key = (namespace, stream_id)
        if key in self._streams:
            raise AlreadyExists(f"stream {stream_id}: already exists")
        self._streams[key] = stream

    def unregister(self, namespace: str, stream_id: str) -> None:
        self._streams.pop((namespace, stream_id), None)

    def get(self, namespace: str, stream_id: str) -> Stream:
        try:
            return self._streams[(namespace, stream_id)]
        except KeyError:
            raise NotFound(f"stream {stream_id}: not found") from None


async def receive_data(stream: Stream, window: int = 64 << 10) -> AsyncIterator[bytes]:
    """Bytes a client sends as ``Data`` messages, granting it ``window`` bytes at a time."""
    granted = 0
    while True:
        if granted < window:
            try:
                await stream.send(streaming_pb2.WindowUpdate(update=window))
                granted += window
            except Unavailable:
                pass
        try:
            msg = await stream.recv()
        except EOFError:
            return
        if isinstance(msg, streaming_pb2.Data):
            granted -= len(msg.data)
            if msg.data:
                yield msg.data


async def send_data(stream: Stream, chunks: AsyncIterator[bytes], max_message: int = 32 << 10
                    ) -> None:
    """Send bytes as ``Data`` messages, within the windows the client grants."""
    remaining = 0
    async for chunk in chunks:
        view = memoryview(chunk)
        while view:
            while remaining <= 0:
                try:
                    msg = await stream.recv()
                except EOFError:
                    raise Unavailable("the receiver closed the stream before the end "
                                      "of the data") from None
                if isinstance(msg, streaming_pb2.WindowUpdate):
                    remaining += msg.update
            size = min(len(view), remaining, max_message)
            await stream.send(streaming_pb2.Data(data=bytes(view[:size])))
            view = view[size:]
            remaining -= size
