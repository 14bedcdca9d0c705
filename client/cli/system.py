"""version, info, events and namespace commands."""
from __future__ import annotations

import json
from datetime import datetime, timezone

import click

from ctrd import __version__, errors

from ..client import AsyncClient
from .main import Settings, cli, pass_settings
from .output import format_option, print_json, print_json_line, print_table


def parse_labels(items: tuple[str, ...]) -> dict[str, str]:
    labels = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not key:
            raise click.BadParameter(f"{item!r}: want KEY=VALUE", param_hint="--label")
        labels[key] = value
    return labels


@cli.command()
@format_option()
@pass_settings
def version(settings: Settings, fmt: str) -> None:
    """Show client and daemon versions."""
    server = settings.run(lambda c: c.version())
    data = {"client": {"version": __version__},
            "server": {"version": server.version, "revision": server.revision,
                       "address": settings.address}}
    if fmt == "json":
        print_json(data)
        return
    click.echo(f"Client:\n  Version:  {__version__}\n")
    click.echo(f"Server:\n  Version:  {server.version}\n  Revision: {server.revision}\n"
               f"  Address:  {settings.address}")


@cli.command()
@format_option()
@pass_settings
def info(settings: Settings, fmt: str) -> None:
    """Show what the daemon runs: version, plugins, and this namespace's objects."""
    async def gather(client: AsyncClient) -> dict:
        version = await client.version()
        server = await client.introspection.server()
        plugins = await client.introspection.plugins()
        return {
            "server": {"version": version.version, "revision": version.revision,
                       "uuid": server.uuid, "pid": server.pid, "address": settings.address},
            "namespace": settings.namespace,
            "namespaces": len(await client.namespaces.list()),
            "images": len(await client.images.list()),
            "containers": len(await client.containers.list()),
            "running": sum(t.status == "running" for t in await client.tasks.list()),
            "plugins": [{"type": p.type, "id": p.id, "status": "ok" if p.ok else "error",
                         "error": p.error} for p in plugins],
        }
    data = settings.run(gather)
    if fmt == "json":
        print_json(data)
        return
    server = data["server"]
    click.echo(f"Server Version: {server['version']} ({server['revision']})")
    click.echo(f"Address:        {server['address']}")
    click.echo(f"UUID:           {server['uuid']}\nPID:            {server['pid']}")
    click.echo(f"Namespace:      {data['namespace']} (of {data['namespaces']})")
    click.echo(f"Images:         {data['images']}")
    click.echo(f"Containers:     {data['containers']} ({data['running']} running)")
    click.echo("Plugins:")
    print_table(["  TYPE", "ID", "STATUS"],
                [[f"  {p['type']}", p["id"], p["status"] + (f": {p['error']}" if p["error"] else "")]
                 for p in data["plugins"]])


@cli.command()
@click.option("--filter", "-f", "filters", multiple=True,
              help="containerd filter, e.g. 'topic~=/tasks/' (repeat for OR).")
@click.option("--all-namespaces", "-A", is_flag=True, help="Events of every namespace.")
@format_option()
@pass_settings
def events(settings: Settings, filters: tuple[str, ...], all_namespaces: bool, fmt: str) -> None:
    """Print daemon events as they happen (Ctrl-C to stop)."""
    wanted = list(filters)
    if not all_namespaces:
        scope = f"namespace=={settings.namespace}"
        wanted = [f"{scope},{f}" for f in wanted] if wanted else [scope]

    async def follow(client: AsyncClient) -> None:
        async for event in client.events.subscribe(wanted):
            if fmt == "json":
                print_json_line(event)
            else:
                when = datetime.fromtimestamp(event.timestamp / 1e9, timezone.utc)
                click.echo(f"{when.isoformat()} {event.namespace} {event.topic} "
                           f"{json.dumps(event.payload, separators=(',', ':'))}")
    settings.run(follow)


@cli.group("namespace")
def namespace() -> None:
    """Manage namespaces."""


@namespace.command("ls")
@click.option("--quiet", "-q", is_flag=True, help="Names only.")
@format_option()
@pass_settings
def namespace_ls(settings: Settings, quiet: bool, fmt: str) -> None:
    """List namespaces."""
    found = settings.run(lambda c: c.namespaces.list())
    if fmt == "json":
        print_json(found)
    elif quiet:
        for ns in found:
            click.echo(ns.name)
    else:
        print_table(["NAME", "LABELS"],
                    [[ns.name, ",".join(f"{k}={v}" for k, v in sorted(ns.labels.items()))]
                     for ns in found])


@namespace.command("create")
@click.argument("name")
@click.option("--label", "-l", "labels", multiple=True, help="KEY=VALUE (repeatable).")
@pass_settings
def namespace_create(settings: Settings, name: str, labels: tuple[str, ...]) -> None:
    """Create a namespace."""
    settings.run(lambda c: c.namespaces.create(name, parse_labels(labels)))
    click.echo(name)


@namespace.command("rm")
@click.argument("names", nargs=-1, required=True)
@pass_settings
def namespace_rm(settings: Settings, names: tuple[str, ...]) -> None:
    """Remove empty namespaces."""
    async def remove(client: AsyncClient) -> None:
        failed = []
        for name in names:
            try:
                await client.namespaces.delete(name)
                click.echo(name)
            except errors.CtrdError as exc:
                click.echo(f"ctrctl: {name}: {exc}", err=True)
                failed.append(name)
        if failed:
            raise errors.FailedPrecondition(f"could not remove {', '.join(failed)}")
    settings.run(remove)
