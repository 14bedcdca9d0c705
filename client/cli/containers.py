"""Container commands: run, ps, exec, logs, stop, kill, rm, inspect."""
from __future__ import annotations

import asyncio
import os
import signal as signals
import sys
import time

import click

from ctrd import errors

from .. import runner
from .. import spec as specs
from ..client import AsyncClient
from ..containers import DEFAULT_RUNTIME
from .main import Settings, cli, pass_settings
from .output import ago, format_option, print_json, print_table
from .system import parse_labels


def parse_signal(text: str) -> int:
    name = text.upper()
    if name.isdigit():
        number = int(name)
        if not 0 < number < signals.NSIG:
            raise click.BadParameter(f"{text!r} is not a signal number", param_hint="--signal")
        return number
    if not name.startswith("SIG"):
        name = "SIG" + name
    try:
        return int(signals.Signals[name])
    except KeyError:
        raise click.BadParameter(f"unknown signal {text!r}", param_hint="--signal") from None


@cli.command(context_settings={"allow_interspersed_args": False})
@click.argument("image")
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
@click.option("--detach", "-d", is_flag=True, help="Run in the background; print the id.")
@click.option("--interactive", "-i", is_flag=True, help="Keep stdin attached.")
@click.option("--tty", "-t", is_flag=True, help="Allocate a terminal.")
@click.option("--rm", "remove", is_flag=True, help="Remove the container when it exits.")
@click.option("--name", default="", help="Container id (random if not given).")
@click.option("--env", "-e", multiple=True, help="KEY=VALUE (repeatable).")
@click.option("--workdir", "-w", default="", help="Working directory inside the container.")
@click.option("--user", "-u", default="", help="name|uid[:group|gid].")
@click.option("--memory", "-m", default=None, help="Memory limit, e.g. 64m.")
@click.option("--net", "--network", "network", type=click.Choice(["none", "host"]),
              default="none", show_default=True,
              help="host: share the host's network; none: a private one.")
@click.option("--read-only", is_flag=True, help="Mount the root filesystem read-only.")
@click.option("--entrypoint", default=None, help="Override the image's entrypoint.")
@click.option("--hostname", default="", help="Container host name.")
@click.option("--label", "-l", "labels", multiple=True, help="KEY=VALUE (repeatable).")
@click.option("--snapshotter", default="overlayfs", show_default=True)
@click.option("--runtime", default=DEFAULT_RUNTIME, show_default=True)
@pass_settings
def run(settings: Settings, image: str, command: tuple[str, ...], detach: bool,
        interactive: bool, tty: bool, remove: bool, name: str, env: tuple[str, ...],
        workdir: str, user: str, memory: str | None, network: str, read_only: bool,
        entrypoint: str | None, hostname: str, labels: tuple[str, ...], snapshotter: str,
        runtime: str) -> int:
    """Create a container from IMAGE and run COMMAND in it."""
    if detach and remove:
        raise click.UsageError("--rm and --detach cannot be combined")
    if detach and (interactive or tty):
        raise click.UsageError("--detach cannot be combined with -i or -t")
    spec_options = specs.SpecOptions(
        env=specs.parse_env(env), cwd=workdir, terminal=tty,
        memory=specs.parse_size(memory) if memory is not None else None,
        read_only=read_only, host_network=network == "host", hostname=hostname,
        entrypoint=[entrypoint] if entrypoint else ([] if entrypoint == "" else None))
    options = runner.RunOptions(
        image=image, args=command, id=name, spec=spec_options, user=user,
        interactive=interactive, detach=detach, remove=remove, snapshotter=snapshotter,
        runtime=runtime, log_dir=settings.log_dir, fifo_dir=settings.fifo_dir,
        labels=parse_labels(labels))

    async def go(client: AsyncClient) -> int:
        container = await runner.create(client, options)
        try:
            if detach:
                await runner.start_detached(client, container)
                click.echo(container.id)
                return 0
            return await runner.run_attached(client, container, options, _fds())
        except BaseException:
            if remove or detach:
                await _remove_quietly(client, container.id)
            raise
        finally:
            if remove:
                await _remove_quietly(client, container.id)

    return settings.run(go)


async def _remove_quietly(client: AsyncClient, cid: str) -> None:
    try:
        await runner.remove(client, cid, force=True)
    except errors.NotFound:
        pass
    except errors.CtrdError as exc:
        click.echo(f"ctrctl: removing {cid}: {exc}", err=True)


def _fds() -> runner.Terminal:
    return runner.Terminal(sys.stdin.fileno(), sys.stdout.fileno(), sys.stderr.fileno())


@cli.command("ps")
@click.option("--all", "-a", "show_all", is_flag=True, help="Include stopped containers.")
@click.option("--quiet", "-q", is_flag=True, help="Ids only.")
@format_option()
@pass_settings
def ps(settings: Settings, show_all: bool, quiet: bool, fmt: str) -> None:
    """List containers (running ones unless -a)."""
    async def gather(client: AsyncClient) -> list[dict]:
        tasks = {t.container_id: t for t in await client.tasks.list()}
        rows = []
        for c in await client.containers.list():
            task = tasks.get(c.id)
            status = runner.status_text(c, task)
            if not show_all and status not in ("Up", "Paused"):
                continue
            rows.append({"id": c.id, "image": c.image,
                         "command": c.labels.get(runner.LABEL_COMMAND, ""),
                         "created_at": c.created_at, "status": status,
                         "pid": task.pid if task else 0, "labels": c.labels})
        return rows
    rows = settings.run(gather)
    if fmt == "json":
        print_json(rows)
    elif quiet:
        for row in rows:
            click.echo(row["id"])
    else:
        print_table(["CONTAINER ID", "IMAGE", "COMMAND", "CREATED", "STATUS"],
                    [[r["id"], r["image"], _short(r["command"], 24), ago(r["created_at"]),
                      r["status"]] for r in rows])


def _short(text: str, width: int) -> str:
    quoted = f'"{text}"'
    return quoted if len(quoted) <= width else quoted[:width - 4] + '..."'


@cli.command("exec", context_settings={"allow_interspersed_args": False})
@click.argument("container")
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
@click.option("--interactive", "-i", is_flag=True, help="Keep stdin attached.")
@click.option("--tty", "-t", is_flag=True, help="Allocate a terminal.")
@click.option("--env", "-e", multiple=True, help="KEY=VALUE (repeatable).")
@click.option("--workdir", "-w", default="", help="Working directory.")
@click.option("--user", "-u", default="", help="uid[:gid] (numeric).")
@pass_settings
def exec_cmd(settings: Settings, container: str, command: tuple[str, ...], interactive: bool,
             tty: bool, env: tuple[str, ...], workdir: str, user: str) -> int:
    """Run COMMAND in a running container."""
    resolved_user = None
    if user:
        if specs.needs_lookup(user) and not user.partition(":")[0].isdigit():
            raise click.BadParameter("exec takes a numeric uid[:gid]", param_hint="--user")
        resolved_user = specs.resolve_user(user, None, None)

    return settings.run(lambda client: runner.exec_attached(
        client, container, command, interactive=interactive, tty=tty, env=env, cwd=workdir,
        user=resolved_user, fifo_dir=settings.fifo_dir, fds=_fds()))


@cli.command()
@click.argument("container")
@click.option("--follow", "-f", is_flag=True, help="Keep printing new output.")
@click.option("--tail", type=click.IntRange(min=0), default=None, help="Only the last N lines.")
@pass_settings
def logs(settings: Settings, container: str, follow: bool, tail: int | None) -> None:
    """Print the output of a container started with -d."""
    async def locate(client: AsyncClient) -> str:
        found = await client.containers.get(container)
        path = found.labels.get(runner.LABEL_LOG)
        if not path:
            raise errors.FailedPrecondition(
                f"container {container} has no log file (only containers run with -d do)")
        return path
    path = settings.run(locate)
    if not os.path.exists(path):
        if not follow:
            return  # started but has written nothing yet
        open(path, "ab").close()
    out = sys.stdout.buffer
    with open(path, "rb") as handle:
        data = handle.read()
        if tail is not None:
            lines = data.splitlines(keepends=True)
            data = b"".join(lines[-tail:]) if tail else b""
        out.write(data)
        out.flush()
        while follow:
            chunk = handle.read(1 << 16)
            if chunk:
                out.write(chunk)
                out.flush()
                continue
            if not settings.run(lambda c: _running(c, container)):
                out.write(handle.read())
                out.flush()
                return
            time.sleep(0.2)


async def _running(client: AsyncClient, cid: str) -> bool:
    task = await runner.task_of(client, cid)
    return task is not None and task.status in runner.RUNNING


@cli.command()
@click.argument("containers", nargs=-1, required=True)
@click.option("--time", "-t", "timeout", type=click.FloatRange(min=0), default=10.0,
              show_default=True, help="Seconds to wait before SIGKILL.")
@click.option("--signal", "-s", "sig", default="SIGTERM", show_default=True)
@pass_settings
def stop(settings: Settings, containers: tuple[str, ...], timeout: float, sig: str) -> None:
    """Stop containers: a signal, then SIGKILL after the timeout."""
    number = parse_signal(sig)

    async def go(client: AsyncClient) -> None:
        results = await asyncio.gather(
            *(runner.stop(client, cid, timeout, number) for cid in containers),
            return_exceptions=True)
        _report(containers, results)
    settings.run(go)


@cli.command()
@click.argument("containers", nargs=-1, required=True)
@click.option("--signal", "-s", "sig", default="SIGKILL", show_default=True)
@click.option("--all", "all_processes", is_flag=True, help="Signal every process of the task.")
@pass_settings
def kill(settings: Settings, containers: tuple[str, ...], sig: str, all_processes: bool) -> None:
    """Send a signal to containers' main process."""
    number = parse_signal(sig)

    async def one(client: AsyncClient, cid: str) -> None:
        await client.containers.get(cid)
        task = await runner.task_of(client, cid)
        if task is None or task.status not in runner.RUNNING:
            raise errors.FailedPrecondition(f"container {cid} is not running")
        await client.tasks.kill(cid, number, all=all_processes)

    async def go(client: AsyncClient) -> None:
        results = await asyncio.gather(*(one(client, cid) for cid in containers),
                                       return_exceptions=True)
        _report(containers, results)
    settings.run(go)


@cli.command("rm")
@click.argument("containers", nargs=-1, required=True)
@click.option("--force", "-f", is_flag=True, help="Kill running containers first.")
@pass_settings
def rm(settings: Settings, containers: tuple[str, ...], force: bool) -> None:
    """Remove containers."""
    async def go(client: AsyncClient) -> None:
        results = [await _capture(runner.remove(client, cid, force=force)) for cid in containers]
        _report(containers, results)
    settings.run(go)


async def _capture(coro):
    try:
        return await coro
    except errors.CtrdError as exc:
        return exc


def _report(names: tuple[str, ...], results: list) -> None:
    """One line per container; fail overall if any failed (others still happened)."""
    failed = 0
    for name, result in zip(names, results):
        if isinstance(result, errors.CtrdError):
            click.echo(f"ctrctl: {name}: {result}", err=True)
            failed += 1
        elif isinstance(result, BaseException):
            raise result
        else:
            click.echo(name)
    if failed:
        raise click.exceptions.Exit(1)  # each failure is printed above


@cli.command()
@click.argument("containers", nargs=-1, required=True)
@format_option("json")
@pass_settings
def inspect(settings: Settings, containers: tuple[str, ...], fmt: str) -> None:
    """Show containers' records, specs and task state as JSON."""
    async def gather(client: AsyncClient) -> list[dict]:
        out = []
        for cid in containers:
            container = await client.containers.get(cid)
            task = await runner.task_of(client, cid)
            out.append({"container": container, "task": task,
                        "status": runner.status_text(container, task)})
        return out
    print_json(settings.run(gather))
