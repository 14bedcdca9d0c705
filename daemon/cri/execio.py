"""Collecting an ExecSync's output from its FIFOs.

Each stream is kept up to a cap (containerd's 16 MiB, beyond which the reply could
not cross kubelet's gRPC message limit anyway); past it the output is still read and
thrown away, so the command never blocks on a full pipe and can finish.
"""
from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from ctrd.errors import FailedPrecondition

from .fifos import ContainerFifos, open_reader

MAX_STREAM_SIZE = 16 * 1024 * 1024
_READ_SIZE = 64 * 1024


@dataclass(frozen=True, slots=True)
class ExecOutput:
    stdout: bytes
    stderr: bytes
    truncated: bool  # a stream went past the cap and lost its end


@dataclass(slots=True)
class _Capped:
    limit: int
    data: bytearray = field(default_factory=bytearray)
    truncated: bool = False

    def add(self, chunk: bytes) -> None:
        room = self.limit - len(self.data)
        if len(chunk) > room:
            self.truncated = True
            chunk = chunk[:max(room, 0)]
        self.data += chunk


class ExecCapture:
    """Reads an exec's stdout and stderr FIFOs into memory.

    :meth:`start` before the exec starts, so the read ends exist when the shim opens
    the write ends; :meth:`wait` until both streams ended; :meth:`close` always. The
    caller bounds :meth:`wait` with its own timeout, and may still take what arrived
    with :meth:`output`, e.g. when a child of the command keeps the pipes open.
    """

    def __init__(self, fifos: ContainerFifos, max_bytes: int = MAX_STREAM_SIZE) -> None:
        self._fifos = fifos
        self._stdout = _Capped(max_bytes)
        self._stderr = _Capped(max_bytes)
        self._transports: list[asyncio.ReadTransport] = []
        self._pumps: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        if self._transports:
            raise FailedPrecondition("exec output capture already started")
        try:
            pairs = ((self._fifos.stdout, self._stdout), (self._fifos.stderr, self._stderr))
            for path, sink in pairs:
                if path:
                    reader, transport = await open_reader(path)
                    self._transports.append(transport)
                    self._pumps.append(asyncio.create_task(_pump(reader, sink)))
        except BaseException:
            await self.close()
            raise

    async def wait(self) -> ExecOutput:
        """Until both streams ended; cancelling this leaves the reads going."""
        await asyncio.shield(asyncio.gather(*self._pumps))
        return self.output()

    def output(self) -> ExecOutput:
        """What was captured so far."""
        return ExecOutput(
            stdout=bytes(self._stdout.data),
            stderr=bytes(self._stderr.data),
            truncated=self._stdout.truncated or self._stderr.truncated,
        )

    async def close(self) -> None:
        """Stop reading and release the FIFOs' read ends."""
        for transport in self._transports:
            transport.close()
        await asyncio.gather(*self._pumps, return_exceptions=True)


async def _pump(reader: asyncio.StreamReader, sink: _Capped) -> None:
    try:
        while chunk := await reader.read(_READ_SIZE):
            sink.add(chunk)
    except OSError:
        pass  # the stream broke: what arrived is all there is


async def capture(fifos: ContainerFifos, max_bytes: int = MAX_STREAM_SIZE) -> ExecOutput:
    """Open, read both streams to their end, close. The FIFOs are opened when this
    coroutine first runs; a caller that must have them open before the exec starts
    uses :class:`ExecCapture`."""
    cap = ExecCapture(fifos, max_bytes)
    await cap.start()
    try:
        return await cap.wait()
    finally:
        await cap.close()
