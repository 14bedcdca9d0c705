"""CRI container IO: FIFO creation, the CRI log format written from real FIFOs fed by
real writer processes, log reopening after rotation, and ExecSync output capture."""
from __future__ import annotations

import asyncio
import os
import re
import shutil
import stat
import subprocess
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from ctrd.daemon.cri.execio import MAX_STREAM_SIZE, ExecCapture, capture
from ctrd.daemon.cri.fifos import ContainerFifos, create_fifos, remove_fifos
from ctrd.daemon.cri.logs import (
    DEFAULT_MAX_LINE_SIZE,
    FULL,
    PARTIAL,
    LineSplitter,
    LogCopier,
    format_timestamp,
)

from ctrd.errors import AlreadyExists, FailedPrecondition, InvalidArgument

CID = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"
RECORD = re.compile(rb"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{9}Z) (stdout|stderr) ([PF]) (.*)", re.DOTALL)


@pytest.fixture
def workdir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="ctrd-cri-logs-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


class Writers:
    """Writer processes started by a test; any still running at the end are killed by pid."""

    def __init__(self) -> None:
        self.procs: list[asyncio.subprocess.Process] = []

    async def sh(self, script: str, *args: str, stdin: int | None = None) -> asyncio.subprocess.Process:
        proc = await asyncio.create_subprocess_exec("sh", "-c", script, "sh", *args, stdin=stdin)
        self.procs.append(proc)
        return proc


@pytest.fixture
async def writers() -> AsyncIterator[Writers]:
    w = Writers()
    try:
        yield w
    finally:
        for proc in w.procs:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()


def parse_log(path: Path) -> list[tuple[bytes, bytes, bytes]]:
    """(stream, tag, content) of every record; also checks the framing of each line."""
    data = path.read_bytes()
    assert data.endswith(b"\n")
    records = []
    stamps = []
    for line in data[:-1].split(b"\n"):
        m = RECORD.fullmatch(line)
        assert m, line
        stamps.append(m.group(1))
        records.append((m.group(2), m.group(3), m.group(4)))
    assert stamps == sorted(stamps)
    return records


def stream_of(records: list[tuple[bytes, bytes, bytes]], name: bytes) -> list[tuple[bytes, bytes]]:
    return [(tag, content) for stream, tag, content in records if stream == name]


async def start_copier(workdir: Path, *, tty: bool = False, log_name: str = "0.log",
                       max_line_size: int = DEFAULT_MAX_LINE_SIZE) -> tuple[LogCopier, ContainerFifos]:
    fifos = await create_fifos(workdir / "io", CID, stdin=False, tty=tty)
    copier = LogCopier(CID, fifos, str(workdir / log_name) if log_name else "", max_line_size)
    await copier.start()
    return copier, fifos


# --- the format, fed by hand --------------------------------------------------------


def test_timestamp_is_utc_with_nine_fraction_digits() -> None:
    assert format_timestamp(1_000_000_005) == b"1970-01-01T00:00:01.000000005Z"
    assert format_timestamp(1_700_000_000_123_456_789) == b"2023-11-14T22:13:20.123456789Z"


def test_splitter_rules() -> None:
    s = LineSplitter(4)
    assert s.feed(b"ab\n\ncd\r\ne\rf\n") == [(FULL, b"ab"), (FULL, b""), (FULL, b"cd"), (FULL, b"e\rf")]
    # exactly the maximum is one full record; one more byte makes a partial first
    assert s.feed(b"abcd\nabcde\n") == [(FULL, b"abcd"), (PARTIAL, b"abcd"), (FULL, b"e")]
    assert s.feed(b"abcdefgh\n") == [(PARTIAL, b"abcd"), (FULL, b"efgh")]
    assert s.feed(b"tail") == []
    assert s.finish() == [(PARTIAL, b"tail")]
    assert s.finish() == []


def test_splitter_sends_long_runs_early_but_keeps_a_cr_back() -> None:
    s = LineSplitter(4)
    assert s.feed(b"abcd") == []
    assert s.feed(b"\r") == []  # might be a \r\n ending: the line is still exactly 4
    assert s.feed(b"\n") == [(FULL, b"abcd")]
    assert s.feed(b"abcd\rx") == [(PARTIAL, b"abcd")]
    assert s.feed(b"\r\n") == [(FULL, b"\rx")]
    # byte by byte gives what one chunk gives
    line = b"0123456789\r\n"
    one = LineSplitter(4)
    byte_wise = [r for i in range(len(line)) for r in one.feed(line[i:i + 1])]
    assert byte_wise == LineSplitter(4).feed(line) == [
        (PARTIAL, b"0123"), (PARTIAL, b"4567"), (FULL, b"89")]


def _reference_records(stream: bytes, size: int) -> list[tuple[bytes, bytes]]:
    """The rules applied to a whole stream at once."""
    *lines, rest = stream.split(b"\n")
    out = []
    for line, tag in [(ln.removesuffix(b"\r"), FULL) for ln in lines] + ([(rest, PARTIAL)] if rest else []):
        while len(line) > size:
            out.append((PARTIAL, line[:size]))
            line = line[size:]
        out.append((tag, line))
    return out


@pytest.mark.parametrize("seed", range(20))
def test_splitter_does_not_depend_on_read_boundaries(seed: int) -> None:
    import random

    rng = random.Random(seed)
    stream = bytes(rng.choice(b"ab\r\n\x00\xff") for _ in range(rng.randrange(1, 400)))
    size = rng.randrange(1, 9)
    s = LineSplitter(size)
    got, pos = [], 0
    while pos < len(stream):
        step = rng.randrange(1, 12)
        got += s.feed(stream[pos:pos + step])
        pos += step
    got += s.finish()
    assert got == _reference_records(stream, size)


def test_splitter_without_limit() -> None:
    s = LineSplitter(0)
    assert s.feed(b"x" * 100_000) == []
    assert s.feed(b"\n") == [(FULL, b"x" * 100_000)]


# --- FIFOs ------------------------------------------------------------------------


async def test_create_and_remove_fifos(workdir: Path) -> None:
    fifos = await create_fifos(workdir / "io", CID, stdin=True, tty=False)
    assert fifos == ContainerFifos(
        stdin=str(workdir / "io" / f"{CID}-stdin"),
        stdout=str(workdir / "io" / f"{CID}-stdout"),
        stderr=str(workdir / "io" / f"{CID}-stderr"),
    )
    assert stat.S_IMODE(os.stat(workdir / "io").st_mode) == 0o700
    for path in fifos.paths():
        assert stat.S_ISFIFO(os.lstat(path).st_mode)
    # an existing FIFO is reused
    assert await create_fifos(workdir / "io", CID, stdin=True, tty=False) == fifos
    await remove_fifos(fifos)
    await remove_fifos(fifos)
    assert os.listdir(workdir / "io") == []

    tty = await create_fifos(workdir / "io", "exec1", stdin=False, tty=True)
    assert (tty.stdin, tty.stderr) == ("", "")
    assert tty.paths() == [str(workdir / "io" / "exec1-stdout")]
    await remove_fifos(tty)


@pytest.mark.parametrize("id", ["", "..", ".", "../x", "a/b", "/abs", "a\0b", "x" * 77, "a b"])
async def test_fifo_ids_cannot_escape(workdir: Path, id: str) -> None:
    with pytest.raises(InvalidArgument):
        await create_fifos(workdir / "io", id, stdin=True, tty=False)
    assert not (workdir / "io").exists()


@pytest.mark.parametrize("directory", ["relative/io", "/tmp/../etc", "{w}/io/../../x"])
async def test_fifo_dir_must_be_clean_and_absolute(workdir: Path, directory: str) -> None:
    with pytest.raises(InvalidArgument):
        await create_fifos(Path(directory.format(w=workdir)), CID, stdin=False, tty=False)


async def test_fifo_path_taken_by_a_file(workdir: Path) -> None:
    (workdir / "io").mkdir()
    (workdir / "io" / f"{CID}-stderr").write_text("not a fifo")
    with pytest.raises(AlreadyExists):
        await create_fifos(workdir / "io", CID, stdin=False, tty=False)
    # the stdout FIFO made before the failure is gone again
    assert os.listdir(workdir / "io") == [f"{CID}-stderr"]


# --- the log copier ----------------------------------------------------------------


async def test_late_writer_with_stdout_and_stderr(workdir: Path, writers: Writers) -> None:
    copier, fifos = await start_copier(workdir)
    # No writer yet: the copy must not take that for end of output.
    await asyncio.sleep(0.3)
    wait = asyncio.create_task(copier.wait())
    await asyncio.sleep(0.1)
    assert not wait.done()
    proc = await writers.sh(
        'exec >"$1" 2>"$2"; printf "out1\\n\\nout2\\r\\n"; printf "err1\\n" >&2; printf "no newline"',
        fifos.stdout, fifos.stderr)
    assert await proc.wait() == 0
    await asyncio.wait_for(wait, 10)
    records = parse_log(workdir / "0.log")
    assert stream_of(records, b"stdout") == [
        (FULL, b"out1"), (FULL, b""), (FULL, b"out2"), (PARTIAL, b"no newline")]
    assert stream_of(records, b"stderr") == [(FULL, b"err1")]
    await copier.close()
    await remove_fifos(fifos)


async def test_writer_opened_before_the_copier(workdir: Path) -> None:
    """Our shim opens output FIFOs read-write before the daemon may read them."""
    fifos = await create_fifos(workdir / "io", CID, stdin=False, tty=True)
    shim_fd = os.open(fifos.stdout, os.O_RDWR | os.O_CLOEXEC)
    try:
        os.write(shim_fd, b"early\n")
        copier = LogCopier(CID, fifos, str(workdir / "0.log"))
        await copier.start()
        os.write(shim_fd, b"late\n")
    finally:
        os.close(shim_fd)
    await asyncio.wait_for(copier.wait(), 10)
    assert stream_of(parse_log(workdir / "0.log"), b"stdout") == [(FULL, b"early"), (FULL, b"late")]


async def test_huge_line_becomes_partial_chunks(workdir: Path, writers: Writers) -> None:
    copier, fifos = await start_copier(workdir, tty=True)
    size = 100_000
    proc = await writers.sh(f'exec >"$1"; head -c {size} /dev/zero | tr "\\000" x; echo; echo end',
                            fifos.stdout)
    assert await proc.wait() == 0
    await asyncio.wait_for(copier.wait(), 10)
    records = stream_of(parse_log(workdir / "0.log"), b"stdout")
    chunks = records[:-1]
    assert [tag for tag, _ in chunks] == [PARTIAL] * (size // DEFAULT_MAX_LINE_SIZE) + [FULL]
    assert all(len(content) == DEFAULT_MAX_LINE_SIZE for _, content in chunks[:-1])
    assert b"".join(content for _, content in chunks) == b"x" * size
    assert records[-1] == (FULL, b"end")


async def test_binary_output_passes_through(workdir: Path, writers: Writers) -> None:
    copier, fifos = await start_copier(workdir, tty=True)
    proc = await writers.sh('exec >"$1"; printf "\\377\\376\\000\\001 caf\\303\\251 \\300\\n"',
                            fifos.stdout)
    assert await proc.wait() == 0
    await asyncio.wait_for(copier.wait(), 10)
    assert stream_of(parse_log(workdir / "0.log"), b"stdout") == [
        (FULL, b"\xff\xfe\x00\x01 caf\xc3\xa9 \xc0")]


async def test_reopen_after_rotation(workdir: Path, writers: Writers) -> None:
    copier, fifos = await start_copier(workdir, tty=True)
    proc = await writers.sh('exec >"$1"; echo one; read go; echo two', fifos.stdout,
                            stdin=subprocess.PIPE)
    log_path = workdir / "0.log"
    for _ in range(200):
        if log_path.exists() and log_path.read_bytes().endswith(b" F one\n"):
            break
        await asyncio.sleep(0.025)
    os.rename(log_path, workdir / "0.log.1")
    await copier.reopen()
    assert proc.stdin is not None
    proc.stdin.write(b"go\n")
    await proc.stdin.drain()
    proc.stdin.close()
    assert await proc.wait() == 0
    await asyncio.wait_for(copier.wait(), 10)
    assert stream_of(parse_log(workdir / "0.log.1"), b"stdout") == [(FULL, b"one")]
    assert stream_of(parse_log(log_path), b"stdout") == [(FULL, b"two")]


async def test_reopen_failure_keeps_the_old_file(workdir: Path, writers: Writers) -> None:
    (workdir / "logs").mkdir()
    copier, fifos = await start_copier(workdir, tty=True, log_name="logs/0.log")
    proc = await writers.sh('exec >"$1"; echo one; read go; echo two', fifos.stdout,
                            stdin=subprocess.PIPE)
    os.rename(workdir / "logs", workdir / "old")
    with pytest.raises(FileNotFoundError):
        await copier.reopen()
    assert proc.stdin is not None
    proc.stdin.write(b"go\n")
    proc.stdin.close()
    assert await proc.wait() == 0
    await asyncio.wait_for(copier.wait(), 10)
    assert stream_of(parse_log(workdir / "old" / "0.log"), b"stdout") == [(FULL, b"one"), (FULL, b"two")]


async def test_missing_log_folder_fails_start_cleanly(workdir: Path) -> None:
    fifos = await create_fifos(workdir / "io", CID, stdin=False, tty=False)
    before = set(os.listdir("/proc/self/fd"))
    copier = LogCopier(CID, fifos, str(workdir / "missing" / "0.log"))
    with pytest.raises(FileNotFoundError):
        await copier.start()
    assert set(os.listdir("/proc/self/fd")) <= before


async def test_close_stops_a_running_copy(workdir: Path, writers: Writers) -> None:
    copier, fifos = await start_copier(workdir, tty=True)
    proc = await writers.sh('exec >"$1"; printf "line\\npartial"; exec sleep 30', fifos.stdout)
    log_path = workdir / "0.log"
    for _ in range(200):
        if log_path.exists() and log_path.stat().st_size:
            break
        await asyncio.sleep(0.025)
    await asyncio.wait_for(copier.close(), 10)
    # What was read is flushed: the unfinished line as a partial record.
    assert stream_of(parse_log(log_path), b"stdout") == [(FULL, b"line"), (PARTIAL, b"partial")]
    with pytest.raises(FailedPrecondition):
        await copier.reopen()
    proc.kill()
    await proc.wait()


async def test_no_log_path_drains_and_discards(workdir: Path, writers: Writers) -> None:
    copier, fifos = await start_copier(workdir, log_name="")
    proc = await writers.sh('exec >"$1" 2>"$2"; head -c 1000000 /dev/zero; head -c 1000000 /dev/zero >&2',
                            fifos.stdout, fifos.stderr)
    assert await asyncio.wait_for(proc.wait(), 10) == 0
    await asyncio.wait_for(copier.wait(), 10)
    await copier.reopen()  # nothing to reopen: not an error
    assert os.listdir(workdir) == ["io"]


# --- ExecSync capture --------------------------------------------------------------


def test_exec_cap_is_containerds() -> None:
    assert MAX_STREAM_SIZE == 16 * 1024 * 1024


async def test_capture_both_streams(workdir: Path, writers: Writers) -> None:
    fifos = await create_fifos(workdir / "io", "exec1", stdin=False, tty=False)
    cap = ExecCapture(fifos)
    await cap.start()
    proc = await writers.sh('exec >"$1" 2>"$2"; printf "out\\r\\n\\377"; printf err >&2',
                            fifos.stdout, fifos.stderr)
    out = await asyncio.wait_for(cap.wait(), 10)
    await cap.close()
    assert await proc.wait() == 0
    assert (out.stdout, out.stderr, out.truncated) == (b"out\r\n\xff", b"err", False)


async def test_capture_truncates_and_keeps_draining(workdir: Path, writers: Writers) -> None:
    fifos = await create_fifos(workdir / "io", "exec1", stdin=False, tty=True)
    cap_size = 1 << 20
    task = asyncio.create_task(capture(fifos, max_bytes=cap_size))
    await asyncio.sleep(0)  # let it open the FIFO before the writer does
    proc = await writers.sh('exec >"$1"; head -c 5000000 /dev/zero | tr "\\000" y', fifos.stdout)
    # The writer must be able to finish although only the first MiB is kept.
    assert await asyncio.wait_for(proc.wait(), 10) == 0
    out = await asyncio.wait_for(task, 10)
    assert out.stdout == b"y" * cap_size
    assert (out.stderr, out.truncated) == (b"", True)


async def test_capture_with_a_timeout_releases_the_fifos(workdir: Path, writers: Writers) -> None:
    fifos = await create_fifos(workdir / "io", "exec1", stdin=False, tty=False)
    before = set(os.listdir("/proc/self/fd"))
    cap = ExecCapture(fifos)
    await cap.start()
    # A child keeps the pipes open after printing: the caller's timeout ends the wait.
    proc = await writers.sh('exec >"$1" 2>"$2"; echo partial; exec sleep 30', fifos.stdout, fifos.stderr)
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(cap.wait(), 0.5)
    assert cap.output().stdout == b"partial\n"
    await cap.close()
    proc.kill()
    await proc.wait()  # its pidfd goes too
    assert set(os.listdir("/proc/self/fd")) <= before
