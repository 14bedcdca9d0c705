"""Container output in the CRI log format, copied from the shim's FIFOs to the log file.

Kubelet reads the file a container's ``log_path`` names, one record per line::

    <RFC 3339 UTC time, nanoseconds> <stdout|stderr> <F|P> <content>

A line of output ends with a full record (``F``). Lines longer than the maximum size
are cut into partial records (``P``) of exactly that size followed by the final
piece, and output that ends without a newline is flushed as a partial record, as
containerd does. A ``\\r\\n`` ending counts as the newline; any other byte, valid
UTF-8 or not, is kept as is.
"""
from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable

import structlog

from ctrd.errors import FailedPrecondition

from .fifos import ContainerFifos, open_reader

log = structlog.get_logger()

DEFAULT_MAX_LINE_SIZE = 16 * 1024
STDOUT = b"stdout"
STDERR = b"stderr"
FULL = b"F"
PARTIAL = b"P"
_READ_SIZE = 64 * 1024
# Kubelet rotates and reads the file; other users have no business with container output.
_LOG_MODE = 0o640

Record = tuple[bytes, bytes]  # (tag, content)


def format_timestamp(ns: int) -> bytes:
    """UTC time with all nine fraction digits, so records also sort as text."""
    seconds, fraction = divmod(ns, 1_000_000_000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)).encode() + b".%09dZ" % fraction


class LineSplitter:
    """Turns one stream's bytes, as they arrive, into records.

    At most ``max_line_size`` (+1) bytes wait for their newline: a longer run is sent
    on as partial records right away. A non-positive size means no limit.
    """

    def __init__(self, max_line_size: int = DEFAULT_MAX_LINE_SIZE) -> None:
        self._max = max_line_size
        self._pending = bytearray()

    def feed(self, data: bytes) -> list[Record]:
        *lines, rest = data.split(b"\n")
        records: list[Record] = []
        if lines:
            if self._pending:
                lines[0] = bytes(self._pending) + lines[0]
                self._pending.clear()
            # The common case, short lines without \r, stays in C-speed loops.
            if b"\r" in data or b"\r" in lines[0]:
                lines = [line[:-1] if line.endswith(b"\r") else line for line in lines]
            if self._max <= 0 or max(map(len, lines)) <= self._max:
                records = [(FULL, line) for line in lines]
            else:
                for line in lines:
                    self._split(line, FULL, records)
        self._pending += rest
        self._send_overflow(records)
        return records

    def finish(self) -> list[Record]:
        """What is left at end of stream: a last line that never got its newline."""
        records: list[Record] = []
        line = bytes(self._pending)
        self._pending.clear()
        if line:
            self._split(line, PARTIAL, records)
        return records

    def _split(self, line: bytes, last_tag: bytes, records: list[Record]) -> None:
        """Records for one line: pieces of exactly the maximum size, then the rest
        (never empty unless the line is, so a line of exactly the maximum stays one
        record) tagged ``last_tag``."""
        if self._max <= 0 or len(line) <= self._max:
            records.append((last_tag, line))
            return
        head = (len(line) - 1) // self._max * self._max
        records.extend((PARTIAL, line[i:i + self._max]) for i in range(0, head, self._max))
        records.append((last_tag, line[head:]))

    def _send_overflow(self, records: list[Record]) -> None:
        if self._max <= 0:
            return
        # A trailing \r may be the first half of a \r\n ending, which must not land
        # in a record: keep it back until the next byte shows what it is.
        held = 1 if self._pending.endswith(b"\r") else 0
        sendable = (len(self._pending) - held - 1) // self._max * self._max
        if sendable > 0:
            chunk = bytes(self._pending[:sendable])
            del self._pending[:sendable]
            records.extend((PARTIAL, chunk[i:i + self._max]) for i in range(0, sendable, self._max))


def _open_log(path: str) -> int:
    # The folder is kubelet's to make; a missing one is an error to report.
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, _LOG_MODE)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


class LogCopier:
    """Copies a container's stdout and stderr FIFOs into its CRI log file.

    Both streams go to the one file; each batch of whole records is a single
    append made under a lock, so records of the two streams never interleave and
    timestamps rise through the file. Writes run on a worker thread so a slow disk
    does not stall the daemon, and while one is pending the FIFO is not read, so a
    chatty container waits instead of filling the daemon's memory. With no log
    path the output is read and dropped, or the container would block on a full
    pipe.
    """

    def __init__(
        self, id: str, fifos: ContainerFifos, log_path: str,
        max_line_size: int = DEFAULT_MAX_LINE_SIZE,
    ) -> None:
        self._log = log.bind(id=id, log_path=log_path)
        self._fifos = fifos
        self._log_path = log_path
        self._max_line_size = max_line_size
        self._fd: int | None = None
        self._lock = asyncio.Lock()
        self._transports: list[asyncio.ReadTransport] = []
        self._run: asyncio.Task[None] | None = None
        # Attached clients: each gets (stream, chunk) as read, and (stream, b"") at its end.
        self._listeners: set[Callable[[bytes, bytes], None]] = set()

    async def start(self) -> None:
        """Open the log file and the FIFOs' read ends; the shim may open the write
        ends at any time after this returns."""
        if self._run is not None:
            raise FailedPrecondition("log copier already started")
        pumps: list[asyncio.Task[None]] = []
        try:
            if self._log_path:
                self._fd = await asyncio.to_thread(_open_log, self._log_path)
            for stream, path in ((STDOUT, self._fifos.stdout), (STDERR, self._fifos.stderr)):
                if path:
                    reader, transport = await open_reader(path)
                    self._transports.append(transport)
                    pumps.append(asyncio.create_task(self._pump(stream, reader)))
        except BaseException:
            for transport in self._transports:
                transport.close()
            await asyncio.gather(*pumps, return_exceptions=True)
            self._close_fd()
            raise
        self._run = asyncio.create_task(self._finish(pumps))

    async def wait(self) -> None:
        """Until every stream hit end of file (the shim closed it, or :meth:`close`)
        and all its output is in the file. Cancelling this leaves the copy going."""
        if self._run is not None:
            await asyncio.shield(self._run)

    async def reopen(self) -> None:
        """Continue in a new file at the log path, after kubelet renamed the old one.

        If the new file cannot be opened the old one stays in use and the error is raised.
        """
        if not self._log_path:
            return
        async with self._lock:
            if self._fd is None:
                raise FailedPrecondition("container log is closed")
            fd = await asyncio.to_thread(_open_log, self._log_path)
            old, self._fd = self._fd, fd
            os.close(old)
        self._log.info("cri_log_reopened")

    async def close(self) -> None:
        """Stop reading: what was already read is still written, then the file is closed."""
        # Ending the streams rather than cancelling the copy tasks: a cancelled task
        # would leave its write thread running on a descriptor about to be closed.
        for transport in self._transports:
            transport.close()
        await self.wait()

    async def _finish(self, pumps: list[asyncio.Task[None]]) -> None:
        # The pumps catch their own errors; the file must be closed whatever happens.
        try:
            await asyncio.gather(*pumps)
        finally:
            async with self._lock:
                self._close_fd()

    def _close_fd(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)

    def listen(self, listener: Callable[[bytes, bytes], None]) -> Callable[[], None]:
        """Also hand the output to ``listener`` (an attached client) as it is read; it
        must not block. Returns the function that stops it."""
        self._listeners.add(listener)
        return lambda: self._listeners.discard(listener)

    async def _pump(self, stream: bytes, reader: asyncio.StreamReader) -> None:
        splitter = LineSplitter(self._max_line_size)
        try:
            while chunk := await reader.read(_READ_SIZE):
                for listener in list(self._listeners):
                    listener(stream, chunk)
                if self._log_path:
                    await self._write(stream, splitter.feed(chunk))
        except OSError as exc:
            self._log.warning("cri_log_read_failed", stream=stream.decode(), error=str(exc))
        for listener in list(self._listeners):
            listener(stream, b"")
        if self._log_path:
            await self._write(stream, splitter.finish())

    async def _write(self, stream: bytes, records: list[Record]) -> None:
        if not records:
            return
        async with self._lock:
            if self._fd is None:
                return
            # Stamped under the lock so that times never go back within the file.
            head = b"%s %s " % (format_timestamp(time.time_ns()), stream)
            heads = {FULL: head + b"F ", PARTIAL: head + b"P "}
            data = b"".join([heads[tag] + text + b"\n" for tag, text in records])
            try:
                await asyncio.to_thread(_write_all, self._fd, data)
            except OSError as exc:
                # Keep draining: a container must not hang because its log cannot be written.
                self._log.error("cri_log_write_failed", stream=stream.decode(), error=str(exc))
