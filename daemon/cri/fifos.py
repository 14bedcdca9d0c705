"""The named pipes a container's or exec's stdio goes through.

The daemon makes them and hands their paths to the shim, which opens the write
ends of stdout/stderr (and the read end of stdin) when it starts the process. Names
follow containerd's cio (``<id>-stdin``, ``<id>-stdout``, ``<id>-stderr``) so that a
listing of the IO folder reads the same under either daemon.
"""
from __future__ import annotations

import asyncio
import contextlib
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from ctrd import identifiers
from ctrd.errors import AlreadyExists, InvalidArgument

# Only the daemon and the (root) shim should touch a container's stdio.
_MODE = 0o700


@dataclass(frozen=True, slots=True)
class ContainerFifos:
    """Paths of one process's stdio FIFOs; an empty path means the stream is absent
    (no stdin unless asked for, no stderr with a terminal since the pty merges it)."""

    stdin: str
    stdout: str
    stderr: str

    def paths(self) -> list[str]:
        return [p for p in (self.stdin, self.stdout, self.stderr) if p]


def _check(directory: Path, id: str) -> None:
    # The id becomes part of a file name: identifier rules already keep it to one safe
    # path component. The folder comes from the daemon's own state, but a relative or
    # ``..``-laden one would mean a bug that could place FIFOs anywhere.
    identifiers.validate(id)
    text = str(directory)
    if "\0" in text or not directory.is_absolute() or ".." in directory.parts:
        raise InvalidArgument(f"invalid fifo directory {text!r}: must be an absolute clean path")


def _make(path: str) -> None:
    try:
        os.mkfifo(path, _MODE)
    except FileExistsError:
        # A FIFO left by an earlier attempt holds no data once all its ends are
        # closed, so it can be reused; anything else there is not ours to replace.
        if not stat.S_ISFIFO(os.lstat(path).st_mode):
            raise AlreadyExists(f"{path} exists and is not a fifo") from None


def _create(directory: Path, id: str, stdin: bool, tty: bool) -> ContainerFifos:
    directory.mkdir(mode=_MODE, parents=True, exist_ok=True)
    fifos = ContainerFifos(
        stdin=str(directory / f"{id}-stdin") if stdin else "",
        stdout=str(directory / f"{id}-stdout"),
        stderr="" if tty else str(directory / f"{id}-stderr"),
    )
    made: list[str] = []
    try:
        for path in fifos.paths():
            _make(path)
            made.append(path)
    except BaseException:
        _unlink(made)
        raise
    return fifos


def _unlink(paths: list[str]) -> None:
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


async def create_fifos(directory: Path, id: str, stdin: bool, tty: bool) -> ContainerFifos:
    """Make the FIFOs for process ``id`` in ``directory`` (created 0700 if missing)."""
    _check(directory, id)
    return await asyncio.to_thread(_create, directory, id, stdin, tty)


async def remove_fifos(fifos: ContainerFifos) -> None:
    """Unlink the FIFOs; missing ones are fine. The folder is left to its owner, which
    may share it between a container and its execs."""
    await asyncio.to_thread(_unlink, fifos.paths())


async def open_reader(path: str) -> tuple[asyncio.StreamReader, asyncio.ReadTransport]:
    """The read end of an output FIFO as a stream, opened without waiting for a writer.

    Linux reports a FIFO's hang-up to a reader only once a writer has come and gone
    since the reader opened it, so the stream does not end before the shim has even
    opened its side; it ends when the last writer closes. Closing the transport ends
    the stream too. The reader's buffer limit gives backpressure: a stalled consumer
    stops the reads and the writer then blocks on a full pipe.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOFOLLOW)
    pipe = os.fdopen(fd, "rb", buffering=0)
    reader = asyncio.StreamReader()
    try:
        transport, _ = await asyncio.get_running_loop().connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(reader), pipe
        )
    except BaseException:
        pipe.close()
        raise
    return reader, transport
