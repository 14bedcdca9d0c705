"""remotecommand (exec and attach) over a SPDY session."""
from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from functools import partial

import structlog

from ..streams import V3, V4, V5, CommandStreams, Options, parse_resize
from .session import STREAM_TIMEOUT, Session, Stream
from .streamtypes import ERROR, RESIZE, STDERR, STDIN, STDOUT, STREAM_TYPE

log = structlog.get_logger()

CLOSE_LINGER = 5.0  # after GOAWAY, for the client to read everything and hang up


def expected_channels(options: Options, version: str) -> frozenset[str]:
    """The streams a client opens for these options, as kubelet counts them: error
    always, stderr never with a TTY, resize with a TTY from v3 on."""
    kinds = {ERROR}
    if options.stdin:
        kinds.add(STDIN)
    if options.stdout:
        kinds.add(STDOUT)
    if options.stderr and not options.tty:
        kinds.add(STDERR)
    if options.tty and version in (V3, V4, V5):
        kinds.add(RESIZE)
    return frozenset(kinds)


async def serve_command(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, options: Options, version: str,
    handler: Callable[[CommandStreams], Awaitable[None]],
) -> None:
    """Serve one exec/attach over an upgraded connection.

    Waits (up to :data:`STREAM_TIMEOUT`) for the client to open the streams the
    options call for, runs ``handler``, then closes the output streams, says GOAWAY and
    closes the connection. If the client goes away meanwhile, the handler sees EOF on
    stdin and its writes become no-ops. If the handler raises, the client gets a
    failure status (unless one was sent) and the exception propagates after cleanup.
    """
    wanted = expected_channels(options, version)
    channels: dict[str, Stream] = {}
    ready = asyncio.Event()

    def on_stream(stream: Stream) -> None:
        kind = stream.header(STREAM_TYPE)
        fresh = kind in wanted and kind not in channels
        if fresh:
            channels[kind] = stream
        else:
            # Accepted all the same, as kubelet does; its data is dropped.
            log.warning("unexpected remotecommand stream", stream_type=kind, stream=stream.id)
        session.accept(stream, inbound=fresh and kind in (STDIN, RESIZE))
        if wanted <= channels.keys():
            ready.set()

    session = Session(reader, writer, on_stream)
    session.start()
    linger = CLOSE_LINGER
    resizes: asyncio.Task[None] | None = None
    try:
        if not await _first_of(ready, session.lost, timeout=STREAM_TIMEOUT):
            if not session.lost.is_set():
                log.warning("remotecommand client did not open its streams",
                            expected=sorted(wanted), opened=sorted(channels))
            linger = 0.0
            return

        async def send_on(kind: str, data: bytes, *, fin: bool = False) -> None:
            if (stream := channels.get(kind)) is not None:
                await session.send(stream, data, fin=fin)

        stdin = channels[STDIN].inbound if STDIN in channels else None
        streams = CommandStreams(
            options=options, version=version,
            write_stdout=partial(send_on, STDOUT), write_stderr=partial(send_on, STDERR),
            send_status=partial(send_on, ERROR, fin=True), stdin=stdin,
        )
        if RESIZE in channels and (source := channels[RESIZE].inbound) is not None:
            resizes = asyncio.create_task(_pump_resizes(source, streams.resizes))
        try:
            await handler(streams)
        except Exception:
            # A v4 client reads an error stream closed without a status as success.
            await streams.finish(None, "error executing command in container")
            raise
    except asyncio.CancelledError:
        linger = 0.0
        raise
    finally:
        if resizes is not None:
            resizes.cancel()
            await asyncio.gather(resizes, return_exceptions=True)
        for stream in channels.values():
            await session.send(stream, b"", fin=True)
        await session.close(linger=linger)


async def _first_of(ready: asyncio.Event, lost: asyncio.Event, *, timeout: float) -> bool:
    """Whether ``ready`` was set before ``lost`` or the timeout."""
    waits = {asyncio.ensure_future(ready.wait()), asyncio.ensure_future(lost.wait())}
    try:
        await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for wait in waits:
            wait.cancel()
    return ready.is_set() and not lost.is_set()


_MAX_RESIZE_BUFFER = 4096
_MAX_QUEUED_RESIZES = 32
_JSON = json.JSONDecoder()


async def _pump_resizes(source: asyncio.StreamReader,
                        queue: asyncio.Queue[tuple[int, int]]) -> None:
    """The resize stream is a sequence of JSON objects (kubectl writes one per line)."""
    pending = b""
    while chunk := await source.read(_MAX_RESIZE_BUFFER):
        pending = _take_resizes(pending + chunk, queue)
        if len(pending) > _MAX_RESIZE_BUFFER:
            pending = b""


def _take_resizes(buffer: bytes, queue: asyncio.Queue[tuple[int, int]]) -> bytes:
    """Queues the complete messages at the front of ``buffer``; returns the rest."""
    text = buffer.decode("latin-1")
    pos = 0
    while True:
        while pos < len(text) and text[pos] in " \t\r\n":
            pos += 1
        if pos == len(text):
            return b""
        try:
            _, end = _JSON.raw_decode(text, pos)
        except json.JSONDecodeError:
            newline = text.find("\n", pos)
            if newline < 0:
                return text[pos:].encode("latin-1")  # may be a message cut in two
            pos = newline + 1  # junk: skip its line
            continue
        size = parse_resize(text[pos:end].encode("latin-1"))
        if size is not None:
            if queue.qsize() >= _MAX_QUEUED_RESIZES:
                queue.get_nowait()  # only the latest sizes matter
            queue.put_nowait(size)
        pos = end
