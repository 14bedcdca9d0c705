"""Port forwarding over a SPDY session."""
from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import structlog

from .session import _CLOSE_TIMEOUT, SEND_CHUNK, STREAM_TIMEOUT, Session, Stream
from .streamtypes import DATA, ERROR, PORT, REQUEST_ID, STREAM_TYPE

log = structlog.get_logger()

_PORT_FORWARD_GRACE = 1.0  # for the other direction once one has ended, as containerd


@dataclass(eq=False)
class _PortPair:
    request_id: str
    port: int
    error: Stream | None = None
    data: Stream | None = None
    expiry: asyncio.Task[None] | None = None


_PORT = re.compile(r"[0-9]{1,5}")


def _parse_port(text: str) -> int | None:
    if not _PORT.fullmatch(text):
        return None
    port = int(text)
    return port if 0 < port <= 0xFFFF else None


def _port_error(port: int, error: BaseException | str, *, close_connection: bool) -> bytes:
    """kubelet's portForwardErrResponse; older clients print it as text."""
    body: dict[str, object] = {"message": f"error forwarding port {port}: {error}"}
    if close_connection:
        body = {"closeConnection": True, **body}
    return json.dumps(body).encode() + b"\n"


async def serve_portforward(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
    connect: Callable[[int], Awaitable[tuple[asyncio.StreamReader, asyncio.StreamWriter]]],
) -> None:
    """Serve port forwarding until the client hangs up.

    For each forwarded connection the client opens an ``error`` and a ``data`` stream
    sharing a ``requestid`` and a ``port`` header; once both are there, ``connect(port)``
    is called and bytes are piped both ways. A connect failure is reported on the error
    stream.
    """
    pairs: dict[str, _PortPair] = {}
    tasks: set[asyncio.Task[None]] = set()

    def spawn(work: Awaitable[None]) -> None:
        task = asyncio.ensure_future(work)
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    def on_stream(stream: Stream) -> None:
        kind = stream.header(STREAM_TYPE)
        port = _parse_port(stream.header(PORT))
        if port is None or kind not in (ERROR, DATA):
            log.warning("bad portforward stream", stream_type=kind, port=stream.header(PORT))
            session.reject(stream)
            return
        request_id = stream.header(REQUEST_ID) or _legacy_request_id(stream.id, kind)
        pair = pairs.get(request_id)
        if pair is None:
            pair = pairs[request_id] = _PortPair(request_id, port)
            pair.expiry = asyncio.create_task(_expire_pair(session, pairs, pair))
            tasks.add(pair.expiry)
            pair.expiry.add_done_callback(tasks.discard)
        if getattr(pair, kind) is not None:
            # Accepted all the same, as kubelet does, but nothing will read it.
            session.accept(stream)
            if pair.error is not None:
                message = f"{kind} stream already assigned for request {request_id}"
                spawn(session.send(pair.error, message.encode()))
            return
        session.accept(stream, inbound=kind == DATA)
        setattr(pair, kind, stream)
        if pair.error is not None and pair.data is not None:
            del pairs[request_id]
            if pair.expiry is not None:
                pair.expiry.cancel()
            spawn(_forward(session, pair, connect))

    session = Session(reader, writer, on_stream)
    session.start()
    try:
        await session.lost.wait()
    finally:
        for task in list(tasks):
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await session.close()


def _legacy_request_id(stream_id: int, kind: str) -> str:
    # Clients from before the requestid header open error then data, two ids apart.
    return str(stream_id if kind == ERROR else stream_id - 2)


async def _expire_pair(session: Session, pairs: dict[str, _PortPair], pair: _PortPair) -> None:
    await asyncio.sleep(STREAM_TIMEOUT)
    if pairs.get(pair.request_id) is not pair:
        return
    del pairs[pair.request_id]
    log.warning("portforward client did not open both streams", request=pair.request_id)
    if pair.data is not None:
        session.reject(pair.data)
    if pair.error is not None:
        await session.send(pair.error, b"timed out waiting for streams", fin=True)


async def _forward(
    session: Session, pair: _PortPair,
    connect: Callable[[int], Awaitable[tuple[asyncio.StreamReader, asyncio.StreamWriter]]],
) -> None:
    assert pair.data is not None and pair.error is not None
    data, error = pair.data, pair.error
    bound = log.bind(port=pair.port, request=pair.request_id)
    try:
        target_reader, target_writer = await connect(pair.port)
    except Exception as e:  # noqa: BLE001 - whatever the dialer raised, the client reads it
        bound.info("portforward connect failed", error=str(e))
        await session.send(error, _port_error(pair.port, e, close_connection=True), fin=True)
        await session.send(data, b"", fin=True)
        return
    upload = asyncio.create_task(_upload(data, target_writer))
    download = asyncio.create_task(_download(session, target_reader, data))
    ended = asyncio.create_task(data.ended.wait())
    failure: OSError | None = None
    try:
        await asyncio.wait({download, ended}, return_when=asyncio.FIRST_COMPLETED)
        if download.done():
            failure = download.result()
            await session.send(data, b"", fin=True)
            await asyncio.wait({upload, ended}, timeout=_PORT_FORWARD_GRACE,
                               return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (upload, download, ended):
            task.cancel()
        await asyncio.gather(upload, download, ended, return_exceptions=True)
        target_writer.close()
        try:
            await asyncio.wait_for(target_writer.wait_closed(), _CLOSE_TIMEOUT)
        except (TimeoutError, ConnectionError, OSError):
            target_writer.transport.abort()
    if failure is not None:
        bound.info("portforward connection failed", error=str(failure))
        await session.send(error, _port_error(pair.port, failure, close_connection=False))
    await session.send(data, b"", fin=True)
    await session.send(error, b"", fin=True)


async def _upload(data: Stream, target: asyncio.StreamWriter) -> None:
    """Client to target; the client's FIN becomes a half-close of the target."""
    source = data.inbound
    if source is None:
        return
    try:
        while chunk := await source.read(SEND_CHUNK):
            target.write(chunk)
            await target.drain()
        if target.can_write_eof():
            target.write_eof()
    except (ConnectionError, OSError):
        pass  # the download side sees the same connection end


async def _download(session: Session, target: asyncio.StreamReader,
                    data: Stream) -> OSError | None:
    """Target to client, until the target closes; returns how it failed, if it did."""
    try:
        while chunk := await target.read(SEND_CHUNK):
            await session.send(data, chunk)
    except (ConnectionError, OSError) as e:
        return e
    return None
