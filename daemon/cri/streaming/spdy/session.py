"""The server side of one SPDY/3.1 connection: the stream table, reading and writing
frames, PING answers, GOAWAY, flow control, orderly or hostile shutdown.

Flow control. Kubernetes' SPDY library (spdystream) never sends WINDOW_UPDATE and
ignores ours. Holding such a peer to the 64 KiB initial window would stall every exec
printing more than that, so our windows are tracked from the start but only enforced
once the peer shows it does flow control (it sends a WINDOW_UPDATE or an
INITIAL_WINDOW_SIZE setting). In the other direction we send WINDOW_UPDATEs for what
we take in, and bound memory the only way that works with any peer: when a stream's
reader holds too much unread data, the session stops reading the socket and TCP pushes
back.
"""
from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

import structlog

from .frames import (
    CANCEL,
    GOAWAY_PROTOCOL_ERROR,
    INITIAL_WINDOW,
    MAX_WINDOW,
    REFUSED_STREAM,
    SETTINGS_INITIAL_WINDOW_SIZE,
    DataFrame,
    Frame,
    Framer,
    GoAway,
    Headers,
    HeadersFrame,
    Ping,
    ProtocolError,
    RstStream,
    Settings,
    SynStream,
    WindowUpdate,
    encode_data,
    encode_goaway,
    encode_ping,
    encode_rst_stream,
    encode_window_update,
)

log = structlog.get_logger()

MAX_STREAMS = 256  # open at once; port forwarding uses two per forwarded connection

SEND_CHUNK = 32 * 1024
INBOUND_BUFFER = 64 * 1024  # a stream's reader pauses the session beyond twice this
_WRITE_HIGH_WATER = 1024 * 1024  # the read loop waits for the socket beyond this

STREAM_TIMEOUT = 30.0  # for the client to open the streams it announced, as kubelet
_CLOSE_TIMEOUT = 1.0


@dataclass(eq=False)
class Stream:
    """One stream the client opened.

    ``inbound`` gets the client's data if the stream was accepted with ``inbound=True``
    (and EOF when the client closes its side, resets the stream or goes away);
    otherwise the data is dropped. ``ended`` is set once the stream is over: reset by
    the client, closed both ways, or its session lost.
    """

    id: int
    headers: Headers
    remote_closed: bool = False
    local_closed: bool = False
    reset: bool = False
    send_window: int = INITIAL_WINDOW
    recv_unacked: int = 0
    inbound: asyncio.StreamReader | None = None
    ended: asyncio.Event = field(default_factory=asyncio.Event)
    send_lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    def header(self, name: str) -> str:
        values = self.headers.get(name)
        return values[0] if values else ""


class _Valve(asyncio.ReadTransport):
    """Stands in for a stream reader's transport, so that a reader holding too much
    unread data pauses the session's reading like a socket reader pauses its socket."""

    def __init__(self, pause: Callable[[], None], resume: Callable[[], None]) -> None:
        super().__init__()
        self._pause = pause
        self._resume = resume
        self._paused = False

    def pause_reading(self) -> None:
        self._paused = True
        self._pause()

    def resume_reading(self) -> None:
        self._paused = False
        self._resume()

    def is_reading(self) -> bool:
        return not self._paused


class _Signal:
    """Wakes every task waiting for it (a broadcast, unlike asyncio.Event's set/clear)."""

    def __init__(self) -> None:
        self._future: asyncio.Future[None] | None = None

    async def wait(self) -> None:
        if self._future is None:
            self._future = asyncio.get_running_loop().create_future()
        # Shielded: one waiter cancelled must not cancel the others' future.
        await asyncio.shield(self._future)

    def fire(self) -> None:
        if self._future is not None and not self._future.done():
            self._future.set_result(None)
        self._future = None


class Session:
    """The server side of a SPDY/3.1 connection.

    ``on_stream`` is called (in the reading task, before any data of the stream is
    handled) for each stream the client opens, and must :meth:`accept` or
    :meth:`reject` it. ``lost`` is set when the client went away or broke the protocol;
    from then on sends are no-ops and every inbound reader has EOF.
    """

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 on_stream: Callable[[Stream], None], *, framer: Framer | None = None) -> None:
        self._reader = reader
        self._writer = writer
        self._on_stream = on_stream
        self._framer = framer or Framer()
        self._streams: dict[int, Stream] = {}
        self._last_stream_id = 0
        self._send_window = INITIAL_WINDOW
        self._recv_unacked = 0
        self._initial_window = INITIAL_WINDOW
        self._peer_flow_control = False
        self._paused: set[int] = set()
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._window = _Signal()
        self._write_closed = False
        self._task: asyncio.Task[None] | None = None
        self.lost = asyncio.Event()
        self._log = log.bind(peer=str(writer.get_extra_info("peername") or "?"))

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    # -- the application's side

    def accept(self, stream: Stream, *, inbound: bool = False) -> None:
        """Reply to the stream; with ``inbound`` its data goes to ``stream.inbound``."""
        if inbound:
            reader = asyncio.StreamReader(limit=INBOUND_BUFFER)
            reader.set_transport(_Valve(partial(self._pause, stream.id),
                                        partial(self._resume, stream.id)))
            stream.inbound = reader
            if stream.remote_closed or self.lost.is_set():
                reader.feed_eof()
        self._write(self._framer.syn_reply(stream.id))

    def reject(self, stream: Stream, status: int = CANCEL) -> None:
        self._write(encode_rst_stream(stream.id, status))
        stream.reset = stream.remote_closed = stream.local_closed = True
        self._forget(stream)

    def detach(self, stream: Stream) -> None:
        """Drop the stream's further data (nobody reads it any more)."""
        self._end_inbound(stream)
        stream.inbound = None

    async def send(self, stream: Stream, data: bytes, *, fin: bool = False) -> None:
        """DATA frames on the stream, within the peer's windows if it enforces them;
        quietly nothing once the stream or the session is closed."""
        if not data and not fin:
            return
        async with stream.send_lock:
            view = memoryview(data)
            while not (self.lost.is_set() or stream.local_closed):
                size = min(len(view), SEND_CHUNK)
                if size and self._peer_flow_control:
                    room = min(stream.send_window, self._send_window)
                    if room <= 0:
                        await self._window.wait()
                        continue
                    size = min(size, room)
                last = size == len(view)
                self._write(encode_data(stream.id, view[:size], fin=fin and last))
                stream.send_window -= size
                self._send_window -= size
                view = view[size:]
                if fin and last:
                    stream.local_closed = True
                    self._maybe_forget(stream)
                await self._drain()
                if last:
                    return

    async def close(self, *, linger: float = 0.0) -> None:
        """GOAWAY, then up to ``linger`` seconds for the client to hang up.

        Closing a socket with unread input makes the kernel send RST, which can destroy
        output the client has not read yet; so we half-close and keep reading (and
        dropping) until the client is done.
        """
        self._write(encode_goaway(self._last_stream_id))
        for stream in list(self._streams.values()):
            self.detach(stream)
        if linger > 0 and not self.lost.is_set():
            if self._writer.can_write_eof() and not self._writer.is_closing():
                self._writer.write_eof()
            self._write_closed = True
            try:
                await asyncio.wait_for(self.lost.wait(), linger)
            except TimeoutError:
                self._log.debug("spdy client did not hang up")
        self._write_closed = True
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self._writer.close()
        try:
            await asyncio.wait_for(self._writer.wait_closed(), _CLOSE_TIMEOUT)
        except (TimeoutError, ConnectionError, OSError):
            self._writer.transport.abort()

    # -- reading

    async def _run(self) -> None:
        try:
            while True:
                await self._flowing.wait()
                frame = await self._framer.read(self._reader)
                self._dispatch(frame)
                if self._writer.transport.get_write_buffer_size() > _WRITE_HIGH_WATER:
                    await self._drain()
        except (asyncio.IncompleteReadError, ConnectionError, OSError):
            self._log.debug("spdy connection closed by peer")
        except ProtocolError as e:
            self._log.warning("spdy session ended: peer broke the protocol", error=str(e))
            self._write(encode_goaway(self._last_stream_id, GOAWAY_PROTOCOL_ERROR))
            self._write_closed = True
            self._writer.close()
        except Exception:  # noqa: BLE001 - a bug here ends this session, not the daemon
            self._log.exception("spdy session failed")
            self._write_closed = True
            self._writer.close()
        finally:
            self._lose()

    def _dispatch(self, frame: Frame) -> None:
        match frame:
            case DataFrame():
                self._on_data(frame)
            case SynStream():
                self._on_syn_stream(frame)
            case RstStream():
                stream = self._streams.get(frame.stream_id)
                if stream is not None:
                    stream.reset = stream.remote_closed = stream.local_closed = True
                    self._forget(stream)
                    self._window.fire()
            case Settings():
                self._on_settings(frame)
            case Ping():
                if frame.id % 2:  # ours would be even; odd ones are the client's to echo
                    self._write(encode_ping(frame.id))
            case HeadersFrame():
                stream = self._streams.get(frame.stream_id)
                if frame.fin and stream is not None:
                    self._remote_close(stream)
            case WindowUpdate():
                self._on_window_update(frame)
            case GoAway():
                self._log.debug("spdy client sent GOAWAY", status=frame.status)
            case _:  # SYN_REPLY (we open no streams) and unknown control frames
                pass

    def _on_syn_stream(self, frame: SynStream) -> None:
        stream_id = frame.stream_id
        if stream_id % 2 == 0 or stream_id <= self._last_stream_id:
            raise ProtocolError(f"spdy: client opened stream {stream_id} out of order")
        self._last_stream_id = stream_id
        if len(self._streams) >= MAX_STREAMS:
            self._write(encode_rst_stream(stream_id, REFUSED_STREAM))
            return
        stream = Stream(stream_id, frame.headers, remote_closed=frame.fin,
                        local_closed=frame.unidirectional, send_window=self._initial_window)
        self._streams[stream_id] = stream
        self._on_stream(stream)

    def _on_data(self, frame: DataFrame) -> None:
        size = len(frame.data)
        self._recv_unacked += size
        if self._recv_unacked >= INITIAL_WINDOW // 2:
            self._write(encode_window_update(0, self._recv_unacked))
            self._recv_unacked = 0
        stream = self._streams.get(frame.stream_id)
        if stream is None or stream.remote_closed:
            return  # a stream we closed or never had: its data has nowhere to go
        if size:
            if stream.inbound is not None:
                stream.inbound.feed_data(frame.data)
            stream.recv_unacked += size
            if not frame.fin and stream.recv_unacked >= INITIAL_WINDOW // 2:
                self._write(encode_window_update(stream.id, stream.recv_unacked))
                stream.recv_unacked = 0
        if frame.fin:
            self._remote_close(stream)

    def _on_settings(self, frame: Settings) -> None:
        for _flags, key, value in frame.entries:
            if key != SETTINGS_INITIAL_WINDOW_SIZE:
                continue
            if value > MAX_WINDOW:
                raise ProtocolError(f"spdy: initial window of {value}")
            delta, self._initial_window = value - self._initial_window, value
            for stream in self._streams.values():
                stream.send_window += delta
            self._peer_flow_control = True
            self._window.fire()

    def _on_window_update(self, frame: WindowUpdate) -> None:
        self._peer_flow_control = True
        if frame.stream_id == 0:
            self._send_window = min(self._send_window + frame.delta, MAX_WINDOW)
        elif (stream := self._streams.get(frame.stream_id)) is not None:
            stream.send_window = min(stream.send_window + frame.delta, MAX_WINDOW)
        self._window.fire()

    # -- stream bookkeeping

    def _remote_close(self, stream: Stream) -> None:
        stream.remote_closed = True
        self._end_inbound(stream)
        self._maybe_forget(stream)

    def _end_inbound(self, stream: Stream) -> None:
        if stream.inbound is not None:
            stream.inbound.feed_eof()
        self._resume(stream.id)

    def _maybe_forget(self, stream: Stream) -> None:
        if stream.remote_closed and stream.local_closed:
            self._forget(stream)

    def _forget(self, stream: Stream) -> None:
        self._end_inbound(stream)
        self._streams.pop(stream.id, None)
        stream.ended.set()

    def _pause(self, stream_id: int) -> None:
        if stream_id in self._streams:
            self._paused.add(stream_id)
            self._flowing.clear()

    def _resume(self, stream_id: int) -> None:
        self._paused.discard(stream_id)
        if not self._paused:
            self._flowing.set()

    def _lose(self) -> None:
        self.lost.set()
        for stream in list(self._streams.values()):
            self._forget(stream)
        self._paused.clear()
        self._flowing.set()
        self._window.fire()

    # -- writing

    def _write(self, data: bytes) -> None:
        # Header blocks share one compression context, so frames go out in the order
        # they were encoded: encode and write without an await in between.
        if self._write_closed or self.lost.is_set() or self._writer.is_closing():
            return
        self._writer.write(data)

    async def _drain(self) -> None:
        if self.lost.is_set() or self._writer.is_closing():
            return
        try:
            await self._writer.drain()
        except (ConnectionError, OSError):
            self._lose()
