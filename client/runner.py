"""Container workflows built from the API: run, exec, stop, remove.

These are what `ctrctl` does, kept here so scripts can do the same: creating a
container from an image (unpack, writable snapshot, spec), starting its task with
stdio attached through fifos or sent to a log file, and tearing it down again.
Bookkeeping that the API has no field for (log file, last exit status) lives in
container labels, so any client can read it back.
"""
from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import signal as signals
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from ctrd import errors, identifiers, reference
from ctrd.oci import spec as oci

from . import spec as specs
from .cio import DEFAULT_FIFO_DIR, Attach, FifoSet
from .client import AsyncClient
from .containers import DEFAULT_RUNTIME, Container
from .images import Image
from .snapshots import DEFAULT_SNAPSHOTTER
from .tasks import Exit, Process, Stdio
from .types import Mount
from .unpack import unpack

LABEL_LOG = "io.ctrctl/log-path"
LABEL_EXIT = "io.ctrctl/exit-status"
LABEL_EXITED_AT = "io.ctrctl/exited-at"
LABEL_COMMAND = "io.ctrctl/command"
# Output still buffered in the fifos is copied for this long after the process
# exited; a background child holding stdout open must not hang the client.
DRAIN_SECONDS = 5.0
RUNNING = ("running", "paused", "pausing", "created")


def default_log_dir(address: str) -> str:
    """Next to the daemon's socket, which lives in its state directory."""
    path = address[len("unix://"):] if address.startswith("unix://") else address
    return str(Path(path).resolve().parent / "ctrctl" / "logs")


@dataclass
class RunOptions:
    image: str
    args: Sequence[str] = ()
    id: str = ""
    spec: specs.SpecOptions = field(default_factory=specs.SpecOptions)
    user: str = ""                 # docker syntax, resolved in the image's files
    interactive: bool = False
    detach: bool = False
    remove: bool = False
    snapshotter: str = DEFAULT_SNAPSHOTTER
    runtime: str = DEFAULT_RUNTIME
    log_dir: str = ""
    fifo_dir: str = DEFAULT_FIFO_DIR
    labels: dict[str, str] = field(default_factory=dict)


def new_id() -> str:
    return secrets.token_hex(6)


async def find_image(client: AsyncClient, name: str) -> Image:
    """The image called ``name`` as typed (``busybox`` means docker.io/library/busybox:latest)."""
    try:
        return await client.images.get(name)
    except (errors.NotFound, errors.InvalidArgument):
        pass
    normalized = str(reference.normalize(name))
    try:
        return await client.images.get(normalized)
    except errors.NotFound:
        raise errors.NotFound(f"image {name!r} not found (looked for {normalized})") from None


async def create(client: AsyncClient, opts: RunOptions) -> Container:
    """Create a container from an image: unpacked layers, a writable snapshot named
    after the container, and a spec built from the image's config."""
    cid = opts.id or new_id()
    identifiers.validate(cid)
    image = await find_image(client, opts.image)
    async with client.leased() as leased:
        resolved = await leased.images.resolve(image)
        snapshots = leased.snapshots.using(opts.snapshotter)
        top = await unpack(resolved, snapshots, leased.diff, leased.content)
        spec_opts = replace(opts.spec, args=list(opts.args) or list(opts.spec.args))
        user = opts.user or (resolved.config.get("config") or {}).get("User", "")
        if user:
            spec_opts.user = await _resolve_user(leased, opts.snapshotter, top, user)
        spec = specs.build(cid, client.namespace, resolved.config, spec_opts)
        labels = dict(opts.labels)
        labels[LABEL_COMMAND] = " ".join(spec["process"]["args"])[:4000]
        if opts.detach:
            log_dir = opts.log_dir or default_log_dir(client.address)
            labels[LABEL_LOG] = os.path.join(log_dir, client.namespace, f"{cid}.log")
        await snapshots.prepare(cid, top)
        try:
            return await leased.containers.create(Container(
                cid, image.name, opts.runtime, spec, opts.snapshotter, cid, labels))
        except BaseException:
            with contextlib.suppress(errors.CtrdError):
                await snapshots.remove(cid)
            raise


async def _resolve_user(client: AsyncClient, snapshotter: str, parent: str,
                        user: str) -> specs.User:
    if not specs.needs_lookup(user):
        return specs.resolve_user(user, None, None)
    files = await read_rootfs_files(client, snapshotter, parent, ["etc/passwd", "etc/group"])
    passwd, group = files.get("etc/passwd"), files.get("etc/group")
    found = specs.resolve_user(user, passwd, group)
    gids = oci.additional_gids(str(found.uid), found.gid, passwd, group)
    return replace(found, additional_gids=tuple(gids))


async def read_rootfs_files(client: AsyncClient, snapshotter: str, parent: str,
                            paths: list[str], limit: int = 1 << 20) -> dict[str, str]:
    """Small text files of a committed snapshot, read through a temporary read-only
    view mounted on this host (the client must be local and root, as for ctr)."""
    key = f"ctrctl-view-{secrets.token_hex(6)}"
    snapshots = client.snapshots.using(snapshotter)
    mounts = await snapshots.view(key, parent)
    try:
        return await asyncio.to_thread(_read_mounted, mounts, paths, limit)
    finally:
        with contextlib.suppress(errors.CtrdError):
            await snapshots.remove(key)


def _read_mounted(mounts: list[Mount], paths: list[str], limit: int) -> dict[str, str]:
    target = tempfile.mkdtemp(prefix="ctrctl-rootfs-")
    mounted: list[str] = []
    try:
        for m in mounts:
            options = [o for o in m.options if o]
            cmd = ["mount", "-t", m.type or "none"]
            if options:
                cmd += ["-o", ",".join(options)]
            result = subprocess.run([*cmd, m.source, target], capture_output=True, text=True)
            if result.returncode != 0:
                raise errors.FailedPrecondition(
                    f"cannot mount the image to read its users: {result.stderr.strip()}")
            mounted.append(target)
        out = {}
        for rel in paths:
            # The image is untrusted: never follow its symlinks out of the rootfs.
            full = os.path.join(target, rel)
            if os.path.islink(full) or not os.path.isfile(full):
                continue
            with open(full, "rb") as handle:
                out[rel] = handle.read(limit).decode(errors="replace")
        return out
    finally:
        for path in reversed(mounted):
            subprocess.run(["umount", path], capture_output=True)
        with contextlib.suppress(OSError):
            os.rmdir(target)


# -- starting and attaching -------------------------------------------------------


@dataclass
class Terminal:
    """The caller's side of stdio: the fds copied to and from the process."""

    stdin: int = 0
    stdout: int = 1
    stderr: int = 2


async def rootfs_mounts(client: AsyncClient, container: Container) -> list[Mount]:
    if not container.snapshot_key:
        return []
    return await client.snapshots.using(container.snapshotter or DEFAULT_SNAPSHOTTER).mounts(
        container.snapshot_key)


async def start_detached(client: AsyncClient, container: Container) -> int:
    """Start the task with stdout and stderr appended to the container's log file."""
    log = container.labels.get(LABEL_LOG, "")
    stdio = Stdio(stdout=f"file://{log}", stderr=f"file://{log}") if log else Stdio()
    mounts = await rootfs_mounts(client, container)
    await client.tasks.create(container.id, stdio, mounts)
    try:
        return await client.tasks.start(container.id)
    except BaseException:
        with contextlib.suppress(errors.CtrdError):
            await client.tasks.delete(container.id)
        raise


@dataclass
class Session:
    """The fifos of a process being attached, and the stdin bookkeeping.

    CloseIO is only valid once the process exists, while the caller's stdin may
    end before that (``echo x | ctrctl run -i``): the end is noted, and passed on
    by :meth:`started`.
    """

    fifos: FifoSet
    stdin_ended: asyncio.Event = field(default_factory=asyncio.Event)
    _closer: asyncio.Task | None = None

    def started(self, client: AsyncClient, container_id: str, exec_id: str) -> None:
        if self.fifos.stdin:
            self._closer = asyncio.create_task(self._close_stdin(client, container_id, exec_id))

    async def _close_stdin(self, client: AsyncClient, container_id: str, exec_id: str) -> None:
        await self.stdin_ended.wait()
        with contextlib.suppress(errors.CtrdError):
            await client.tasks.close_stdin(container_id, exec_id)

    def stop(self) -> None:
        if self._closer is not None:
            self._closer.cancel()


@contextlib.asynccontextmanager
async def attached(fifo_dir: str, name: str, *, interactive: bool, tty: bool,
                   fds: Terminal) -> AsyncIterator[Session]:
    """Fifos for a process, with copying to/from ``fds`` running for the duration."""
    loop = asyncio.get_running_loop()
    session = Session(FifoSet.create(fifo_dir, name, stdin=interactive, terminal=tty))

    def stdin_done() -> None:
        with contextlib.suppress(RuntimeError):  # the loop may be gone already
            loop.call_soon_threadsafe(session.stdin_ended.set)

    attach = Attach(session.fifos, fds.stdin if interactive else None, fds.stdout, fds.stderr,
                    on_stdin_eof=stdin_done)
    attach.start()
    try:
        yield session
        await asyncio.to_thread(attach.wait, DRAIN_SECONDS)
    finally:
        session.stop()
        attach.cancel()
        session.fifos.remove()


async def resize_from(client: AsyncClient, container_id: str, exec_id: str, fd: int) -> None:
    try:
        size = os.get_terminal_size(fd)
    except OSError:
        return
    with contextlib.suppress(errors.CtrdError):
        await client.tasks.resize(container_id, size.columns, size.lines, exec_id)


@contextlib.contextmanager
def raw_terminal(fd: int):
    """The caller's terminal in raw mode (keys go to the container as typed)."""
    import termios
    import tty
    try:
        saved = termios.tcgetattr(fd)
    except termios.error:
        yield
        return
    tty.setraw(fd)
    try:
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


@contextlib.contextmanager
def forwarding(client: AsyncClient, container_id: str, exec_id: str, *, tty: bool):
    """Signals sent to us reach the process instead (docker's sig-proxy), and a
    terminal resize is passed on."""
    loop = asyncio.get_running_loop()
    installed: list[int] = []

    def forward(sig: int) -> None:
        loop.create_task(_kill_quietly(client, container_id, exec_id, sig))

    def on_resize() -> None:
        loop.create_task(resize_from(client, container_id, exec_id, 0))

    for sig in (signals.SIGINT, signals.SIGTERM, signals.SIGHUP, signals.SIGQUIT):
        with contextlib.suppress(ValueError, RuntimeError, NotImplementedError):
            loop.add_signal_handler(sig, forward, sig)
            installed.append(sig)
    if tty:
        with contextlib.suppress(ValueError, RuntimeError, NotImplementedError):
            loop.add_signal_handler(signals.SIGWINCH, on_resize)
            installed.append(signals.SIGWINCH)
    try:
        yield
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)


async def _kill_quietly(client: AsyncClient, container_id: str, exec_id: str, sig: int) -> None:
    with contextlib.suppress(errors.CtrdError):
        await client.tasks.kill(container_id, sig, exec_id=exec_id)


async def run_attached(client: AsyncClient, container: Container, opts: RunOptions,
                       fds: Terminal = Terminal()) -> int:
    """Create and start the task with our stdio attached; returns its exit status."""
    tty = opts.spec.terminal
    mounts = await rootfs_mounts(client, container)
    async with attached(opts.fifo_dir, container.id, interactive=opts.interactive, tty=tty,
                        fds=fds) as session:
        await client.tasks.create(container.id, session.fifos.stdio(), mounts)
        try:
            waiter = asyncio.create_task(client.tasks.wait(container.id))
            with raw_terminal(fds.stdin) if tty and opts.interactive else contextlib.nullcontext():
                await client.tasks.start(container.id)
                session.started(client, container.id, "")
                if tty:
                    await resize_from(client, container.id, "", fds.stdin)
                with forwarding(client, container.id, "", tty=tty):
                    exit = await waiter
        except BaseException:
            with contextlib.suppress(errors.CtrdError):
                await client.tasks.kill(container.id, signals.SIGKILL, all=True)
                await client.tasks.delete(container.id)
            raise
    await finish(client, container.id, exit)
    return exit.status


async def finish(client: AsyncClient, container_id: str, exit: Exit | None) -> None:
    """Delete a stopped task and keep its exit status on the container."""
    with contextlib.suppress(errors.NotFound):
        deleted = await client.tasks.delete(container_id)
        exit = exit or deleted
    if exit is not None:
        with contextlib.suppress(errors.NotFound):
            await client.containers.set_labels(container_id, {
                LABEL_EXIT: str(exit.status),
                LABEL_EXITED_AT: str(exit.exited_at or time.time_ns())})


async def exec_attached(client: AsyncClient, container_id: str, args: Sequence[str], *,
                        interactive: bool, tty: bool, env: Sequence[str] = (), cwd: str = "",
                        user: specs.User | None = None, fifo_dir: str = DEFAULT_FIFO_DIR,
                        fds: Terminal = Terminal()) -> int:
    container = await client.containers.get(container_id)
    task = await task_of(client, container_id)
    if task is None or task.status != "running":
        raise errors.FailedPrecondition(f"container {container_id} is not running")
    process = specs.process_for_exec(container.spec or {}, args, terminal=tty, env=env,
                                     cwd=cwd, user=user)
    exec_id = f"exec-{secrets.token_hex(6)}"
    async with attached(fifo_dir, exec_id, interactive=interactive, tty=tty,
                        fds=fds) as session:
        await client.tasks.exec(container_id, exec_id, process, session.fifos.stdio())
        try:
            waiter = asyncio.create_task(client.tasks.wait(container_id, exec_id))
            with raw_terminal(fds.stdin) if tty and interactive else contextlib.nullcontext():
                await client.tasks.start(container_id, exec_id)
                session.started(client, container_id, exec_id)
                if tty:
                    await resize_from(client, container_id, exec_id, fds.stdin)
                with forwarding(client, container_id, exec_id, tty=tty):
                    exit = await waiter
        finally:
            with contextlib.suppress(errors.CtrdError):
                await client.tasks.delete(container_id, exec_id)
    return exit.status


# -- stopping and removing ----------------------------------------------------------


async def task_of(client: AsyncClient, container_id: str) -> Process | None:
    try:
        return await client.tasks.get(container_id)
    except errors.NotFound:
        return None


async def stop(client: AsyncClient, container_id: str, timeout: float = 10.0,
               signal: int = signals.SIGTERM) -> Exit | None:
    """Signal the task, SIGKILL it after ``timeout`` seconds, delete it; returns its
    exit (None if it was not running)."""
    await client.containers.get(container_id)
    task = await task_of(client, container_id)
    if task is None:
        return None
    exit: Exit | None = None
    if task.status != "stopped":
        waiter = asyncio.create_task(client.tasks.wait(container_id))
        try:
            if task.status == "paused":
                await client.tasks.resume(container_id)
            await client.tasks.kill(container_id, signal)
            exit = await asyncio.wait_for(asyncio.shield(waiter), timeout)
        except (asyncio.TimeoutError, errors.FailedPrecondition):
            await client.tasks.kill(container_id, signals.SIGKILL, all=True)
            exit = await waiter
        except errors.NotFound:
            waiter.cancel()
    await finish(client, container_id, exit)
    return exit


async def remove(client: AsyncClient, container_id: str, *, force: bool = False) -> None:
    """Delete a container, its task (only if stopped, unless ``force``), its writable
    snapshot and its log file."""
    container = await client.containers.get(container_id)
    task = await task_of(client, container_id)
    if task is not None:
        if task.status in RUNNING and task.status != "created" and not force:
            raise errors.FailedPrecondition(
                f"container {container_id} is {task.status}: stop it first or use --force")
        if task.status != "stopped":
            await stop(client, container_id, timeout=0.0, signal=signals.SIGKILL)
        with contextlib.suppress(errors.NotFound):
            await client.tasks.delete(container_id)
    if container.snapshot_key:
        with contextlib.suppress(errors.NotFound):
            await client.snapshots.using(container.snapshotter or DEFAULT_SNAPSHOTTER).remove(
                container.snapshot_key)
    await client.containers.delete(container_id)
    log = container.labels.get(LABEL_LOG)
    if log:
        with contextlib.suppress(OSError):
            os.unlink(log)


def status_text(container: Container, task: Process | None) -> str:
    """docker ps's STATUS column."""
    if task is not None and task.status == "running":
        return "Up"
    if task is not None and task.status in ("paused", "pausing"):
        return "Paused"
    if task is not None and task.status == "created":
        return "Created"
    if task is not None and task.status == "stopped":
        return f"Exited ({task.exit_status})"
    if LABEL_EXIT in container.labels:
        return f"Exited ({container.labels[LABEL_EXIT]})"
    return "Created"

