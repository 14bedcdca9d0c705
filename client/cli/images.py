"""Image commands: pull, images, image ls/rm/tag/inspect/import/save/build-default, load,
save."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import click
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

from ctrd import errors, reference

from ..client import AsyncClient
from ..images import Image
from ..runner import find_image
from ..archive import ImportResult
from ..transfer import ArchiveExportOptions, ArchiveImportOptions, PullOptions
from ..transfer import Progress as TransferProgress
from ..types import Platform
from .main import Settings, cli, pass_settings
from .output import ago, format_option, human_size, print_json, print_table


def familiar(name: str) -> tuple[str, str]:
    """(repository, tag) as docker shows them."""
    try:
        ref = reference.parse_normalized(name)
    except errors.InvalidArgument:
        return name, ""
    repo = reference.Reference(ref.domain, ref.path).familiar()
    return repo, ref.tag or (ref.digest and "<digest>") or "<none>"


async def _image_rows(client: AsyncClient) -> list[dict]:
    rows = []
    for image in await client.images.list():
        try:
            size = (await client.images.resolve(image)).size
        except errors.CtrdError:
            size = None  # content missing or not for this platform
        rows.append({"name": image.name, "digest": image.target.digest,
                     "media_type": image.target.media_type, "size": size,
                     "created_at": image.created_at, "labels": image.labels})
    return rows


def _list_images(settings: Settings, quiet: bool, fmt: str) -> None:
    rows = settings.run(_image_rows)
    if fmt == "json":
        print_json(rows)
    elif quiet:
        for row in rows:
            click.echo(row["name"])
    else:
        table = []
        for row in rows:
            repo, tag = familiar(row["name"])
            table.append([repo, tag, row["digest"].removeprefix("sha256:")[:12],
                          ago(row["created_at"]),
                          human_size(row["size"]) if row["size"] is not None else "-"])
        print_table(["REPOSITORY", "TAG", "IMAGE ID", "CREATED", "SIZE"], table)


@cli.command("images")
@click.option("--quiet", "-q", is_flag=True, help="Names only.")
@format_option()
@pass_settings
def images_cmd(settings: Settings, quiet: bool, fmt: str) -> None:
    """List images."""
    _list_images(settings, quiet, fmt)


@cli.group("image")
def image() -> None:
    """Manage images."""


@image.command("ls")
@click.option("--quiet", "-q", is_flag=True, help="Names only.")
@format_option()
@pass_settings
def image_ls(settings: Settings, quiet: bool, fmt: str) -> None:
    """List images."""
    _list_images(settings, quiet, fmt)


@image.command("rm")
@click.argument("names", nargs=-1, required=True)
@click.option("--sync", is_flag=True, help="Wait until unused content is collected.")
@pass_settings
def image_rm(settings: Settings, names: tuple[str, ...], sync: bool) -> None:
    """Remove images by name."""
    async def remove(client: AsyncClient) -> None:
        failed = []
        for name in names:
            try:
                found = await find_image(client, name)
                await client.images.delete(found.name, sync=sync)
                click.echo(f"Untagged: {found.name}")
            except errors.CtrdError as exc:
                click.echo(f"ctrctl: {exc}", err=True)
                failed.append(name)
        if failed:
            raise errors.NotFound(f"could not remove {len(failed)} of {len(names)} images")
    settings.run(remove)


@image.command("tag")
@click.argument("source")
@click.argument("target")
@pass_settings
def image_tag(settings: Settings, source: str, target: str) -> None:
    """Give an image another name."""
    name = str(reference.normalize(target))

    async def tag(client: AsyncClient) -> None:
        found = await find_image(client, source)
        await client.images.put(Image(name, found.target, dict(found.labels)))
    settings.run(tag)
    click.echo(name)


@image.command("inspect")
@click.argument("names", nargs=-1, required=True)
@format_option("json")
@pass_settings
def image_inspect(settings: Settings, names: tuple[str, ...], fmt: str) -> None:
    """Show image records with their manifest and config."""
    async def inspect(client: AsyncClient) -> list[dict]:
        out = []
        for name in names:
            found = await find_image(client, name)
            entry: dict = {"image": found}
            try:
                resolved = await client.images.resolve(found)
                entry.update(manifest=resolved.manifest, config=resolved.config,
                             layers=resolved.layers, size=resolved.size)
            except errors.CtrdError as exc:
                entry["error"] = str(exc)
            out.append(entry)
        return out
    print_json(settings.run(inspect))


# -- pull ---------------------------------------------------------------------------


# Progress names carry full digests ("layer-sha256:<64 hex>"); 12 hex digits are enough.
_DIGEST = re.compile(r"sha256:([0-9a-f]{12})[0-9a-f]*")


class PullDisplay:
    """Progress bars for byte counts, plain lines for other transfer events."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet
        self.bars: dict[str, int] = {}
        self.progress = Progress(TextColumn("{task.description}"), BarColumn(),
                                 DownloadColumn(), TransferSpeedColumn(),
                                 console=Console(stderr=True), transient=False,
                                 disable=quiet)

    def __enter__(self) -> PullDisplay:
        self.progress.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.__exit__(*exc)

    def update(self, item: TransferProgress) -> None:
        if self.quiet:
            return
        if item.total > 0:
            label = _DIGEST.sub(r"\1", item.name) or item.event
            if item.name not in self.bars:
                self.bars[item.name] = self.progress.add_task(label, total=item.total)
            self.progress.update(self.bars[item.name], completed=item.progress,
                                 total=item.total, description=f"{label} {item.event}")
        else:
            self.progress.console.print(f"{item.event} {item.name}".strip())


@cli.command()
@click.argument("ref")
@click.option("--platform", "platforms", multiple=True, help="os/arch[/variant] (repeatable).")
@click.option("--plain-http", is_flag=True, help="Talk to the registry over http.")
@click.option("--no-unpack", is_flag=True, help="Fetch only; do not unpack layers.")
@click.option("--snapshotter", default="overlayfs", show_default=True)
@click.option("--quiet", "-q", is_flag=True, help="No progress output.")
@pass_settings
def pull(settings: Settings, ref: str, platforms: tuple[str, ...], plain_http: bool,
         no_unpack: bool, snapshotter: str, quiet: bool) -> None:
    """Pull an image from a registry (needs the daemon's Transfer service)."""
    name = str(reference.normalize(ref))
    wanted = tuple(Platform.parse(p) for p in platforms) or (Platform.host(),)
    options = PullOptions(platforms=wanted, unpack=not no_unpack, snapshotter=snapshotter,
                          plain_http=plain_http)

    async def go(client: AsyncClient) -> None:
        with PullDisplay(quiet) as display:
            await client.transfer.pull(name, options, progress=display.update)
    settings.run(go)
    click.echo(name)


# -- import -------------------------------------------------------------------------


def _import(settings: Settings, path: str, base_name: str, unpack: bool) -> None:
    if base_name:
        reference.normalize(base_name)  # refuse a bad name before reading anything

    async def go(client: AsyncClient):
        if await client.introspection.has_plugin("io.containerd.grpc.v1", "transfer"):
            # The daemon reads, verifies, names and unpacks the archive itself.
            options = ArchiveImportOptions(
                base_name=str(reference.parse_normalized(base_name)) if base_name else "",
                unpack=unpack)
            names = await client.transfer.import_archive(path, options)
            return ImportResult(images=[await client.images.get(n) for n in names])
        # containerd 1.6 has no Transfer service: read the archive here.
        result = await client.import_archive(path, base_name=base_name)
        if unpack:
            for found in result.images:
                await client.unpack(found.name)
        return result
    result = settings.run(go)
    for found in result.images:
        click.echo(f"Loaded image: {found.name}")
    for digest in result.unnamed:
        click.echo(f"ctrctl: skipped unnamed image {digest} (give --base-name)", err=True)
    if not result.images and not result.unnamed:
        raise errors.InvalidArgument(f"{path}: no images in archive")


def _check_file(path: str) -> None:
    if not os.path.isfile(path):
        raise errors.NotFound(f"{path}: no such file")


@cli.command("import")
@click.argument("archive", type=click.Path(dir_okay=False))
@click.option("--base-name", default="", help="Name for images the archive names by tag only.")
@click.option("--no-unpack", is_flag=True, help="Do not unpack layers after import.")
@pass_settings
def import_cmd(settings: Settings, archive: str, base_name: str, no_unpack: bool) -> None:
    """Import an OCI archive or a `docker save` archive."""
    _check_file(archive)
    _import(settings, archive, base_name, not no_unpack)


image.add_command(import_cmd)


@cli.command()
@click.option("--input", "-i", "path", type=click.Path(dir_okay=False), default=None,
              help="Archive to read [default: stdin].")
@click.option("--no-unpack", is_flag=True, help="Do not unpack layers after loading.")
@pass_settings
def load(settings: Settings, path: str | None, no_unpack: bool) -> None:
    """Load images from an archive file or stdin (docker load)."""
    if path is not None:
        _check_file(path)
        _import(settings, path, "", not no_unpack)
        return
    if sys.stdin.isatty():
        raise click.UsageError("no archive: give --input FILE or pipe one to stdin")
    with tempfile.NamedTemporaryFile(prefix="ctrctl-load-", suffix=".tar", dir="/var/tmp") as tmp:
        shutil.copyfileobj(sys.stdin.buffer, tmp, 1 << 20)
        tmp.flush()
        _import(settings, tmp.name, "", not no_unpack)


# -- save ---------------------------------------------------------------------------


@cli.command()
@click.argument("names", nargs=-1, required=True)
@click.option("--output", "-o", "path", default=None, type=click.Path(dir_okay=False),
              help="Write to FILE [default: stdout].")
@click.option("--platform", "platforms", multiple=True,
              help="os/arch[/variant] (repeatable) [default: this host's].")
@click.option("--all-platforms", is_flag=True, help="Every platform of multi-platform images.")
@pass_settings
def save(settings: Settings, names: tuple[str, ...], path: str | None,
         platforms: tuple[str, ...], all_platforms: bool) -> None:
    """Save images to an OCI archive (docker save; the daemon's Transfer service writes it)."""
    full = [str(reference.normalize(n)) for n in names]  # refuse bad names up front
    if path is None and sys.stdout.isatty():
        raise click.UsageError("refusing to write an archive to a terminal: give -o FILE "
                               "or redirect stdout")
    options = ArchiveExportOptions(platforms=tuple(Platform.parse(p) for p in platforms),
                                   all_platforms=all_platforms)

    async def go(client: AsyncClient) -> None:
        for name in full:
            await client.images.get(name)  # NotFound names the image, before any output
        target = path if path is not None else sys.stdout.buffer
        await client.transfer.export_archive(full, target, options)
    settings.run(go)


image.add_command(save)


@image.command("build-default")
@click.option("--name", default="ctrd.local/busybox:latest", show_default=True)
@click.option("--busybox", "busybox_path", default="/bin/busybox", show_default=True,
              type=click.Path(dir_okay=False), help="A static busybox binary.")
@click.option("--no-unpack", is_flag=True, help="Do not unpack layers after import.")
@pass_settings
def build_default(settings: Settings, name: str, busybox_path: str, no_unpack: bool) -> None:
    """Build the embedded busybox image from the host's busybox and import it."""
    from ctrd.oci import busybox, writer

    full = str(reference.normalize(name))
    _check_file(busybox_path)
    with tempfile.TemporaryDirectory(prefix="ctrctl-build-", dir="/var/tmp") as tmp:
        archive = Path(tmp) / "image.tar"
        try:
            image_obj = busybox.busybox_image(busybox=Path(busybox_path))
        except (subprocess.CalledProcessError, OSError) as exc:
            raise errors.InvalidArgument(f"{busybox_path}: not a usable busybox: {exc}") from None
        writer.write_oci_archive(archive, {full: image_obj})
        _import(settings, str(archive), "", not no_unpack)
