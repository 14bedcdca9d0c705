"""Archive import and export over the Transfer service (containerd 1.7's API).

The client streams OCI and docker archives to the daemon (ImageImportStream ->
ImageStore) and reads archives back (ImageStore -> ImageExportStream), both over
Streaming-service streams with window flow control. Exports are compared with
what containerd 1.6's `ctr images export` writes for the same image, and broken or
hostile archives must fail clearly, leaving no image, lease or ingest behind.
"""
from __future__ import annotations

import io
import json
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from ctrd import errors
from ctrd.client import AsyncClient
from ctrd.client.transfer import ArchiveExportOptions, ArchiveImportOptions
from ctrd.daemon.unpack import chain_ids
from ctrd.oci import busybox, writer

pytestmark = [pytest.mark.integration]

NAME = "example.com/xfer/archive:v1"


@pytest.fixture
def workdir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="ctrd-xarchive-", dir="/var/tmp") as tmp:
        yield Path(tmp)


@pytest.fixture(scope="module")
def image() -> writer.Image:
    return busybox.busybox_image(extra_layers=[[writer.file("etc/archive", "xfer\n")]])


def _members(path: Path) -> dict[str, bytes]:
    with tarfile.open(path) as tar:
        return {m.name.rstrip("/"): (tar.extractfile(m).read() if m.isfile() else b"")
                for m in tar.getmembers()}


def _top_chain(image: writer.Image) -> str:
    return chain_ids([layer.diff_id for layer in image.layers])[-1]


def _left_behind(ctrd) -> tuple[str, str]:
    leases = ctrd.ctr("leases", "ls").stdout.strip().splitlines()[1:]
    active = ctrd.ctr("content", "active").stdout.strip().splitlines()[1:]
    return "\n".join(leases), "\n".join(active)


async def test_import_oci_archive_unpacks(ctrd, image, workdir) -> None:
    archive = workdir / "oci.tar"
    writer.write_oci_archive(archive, {NAME: image})
    seen: list[str] = []
    async with AsyncClient(ctrd.address, namespace="default") as client:
        names = await client.transfer.import_archive(
            archive, progress=lambda p: seen.append(p.event))
        assert names == [NAME]
        found = await client.images.get(NAME)
        assert found.target.digest == image.digest
    assert "Importing" in seen and "unpacked" in seen and "Completed import" in seen
    snapshots = ctrd.ctr("snapshots", "--snapshotter", "overlayfs", "ls").stdout
    assert _top_chain(image) in snapshots
    assert _left_behind(ctrd) == ("", "")


async def test_import_docker_archive(ctrd, image, workdir) -> None:
    archive = workdir / "docker.tar"
    writer.write_docker_archive(archive, {NAME: image})
    async with AsyncClient(ctrd.address, namespace="default") as client:
        # A bare file object works as well as a path.
        with open(archive, "rb") as source:
            names = await client.transfer.import_archive(source)
        assert names == [NAME]
        resolved = await client.images.resolve(await client.images.get(NAME))
        assert resolved.config["rootfs"]["diff_ids"] == [layer.diff_id for layer in image.layers]
    snapshots = ctrd.ctr("snapshots", "--snapshotter", "overlayfs", "ls").stdout
    assert _top_chain(image) in snapshots
    assert _left_behind(ctrd) == ("", "")


async def test_import_docker_archive_force_compress(ctrd, image, workdir) -> None:
    archive = workdir / "docker.tar"
    writer.write_docker_archive(archive, {NAME: image})
    async with AsyncClient(ctrd.address, namespace="default") as client:
        await client.transfer.import_archive(
            archive, ArchiveImportOptions(unpack=False, force_compress=True))
        resolved = await client.images.resolve(await client.images.get(NAME))
        kinds = {layer.media_type for layer in resolved.layers}
    assert kinds == {"application/vnd.docker.image.rootfs.diff.tar.gzip"}


async def test_base_name_names_tag_only_entries(ctrd, image, workdir) -> None:
    layout = workdir / "layout"
    writer.write_oci_layout(layout, {NAME: image})
    index = json.loads((layout / "index.json").read_text())
    index["manifests"][0]["annotations"] = {"org.opencontainers.image.ref.name": "v9"}
    (layout / "index.json").write_text(json.dumps(index))
    archive = workdir / "tagonly.tar"
    with tarfile.open(archive, "w") as tar:
        tar.add(layout, arcname=".")
    async with AsyncClient(ctrd.address, namespace="default") as client:
        assert await client.transfer.import_archive(
            archive, ArchiveImportOptions(unpack=False)) == []
        names = await client.transfer.import_archive(
            archive, ArchiveImportOptions(unpack=False, base_name="example.com/based"))
    assert names == ["example.com/based:v9"]


async def test_export_reimport_and_compare_with_ctr(ctrd, image, workdir) -> None:
    archive = workdir / "in.tar"
    writer.write_oci_archive(archive, {NAME: image})
    exported = workdir / "out.tar"
    async with AsyncClient(ctrd.address, namespace="default") as client:
        await client.transfer.import_archive(archive, ArchiveImportOptions(unpack=False))
        await client.transfer.export_archive([NAME], exported)
        ours = _members(exported)
        blobs = {name for name in ours if name.startswith("blobs/sha256/")}
        assert blobs == {f"blobs/sha256/{b.digest.split(':')[1]}" for b in image.blobs}
        for blob in image.blobs:
            assert ours[f"blobs/sha256/{blob.digest.split(':')[1]}"] == blob.data
        index = json.loads(ours["index.json"])
        assert index["manifests"][0]["annotations"] == {
            "io.containerd.image.name": NAME, "org.opencontainers.image.ref.name": "v1"}
        docker = json.loads(ours["manifest.json"])
        assert docker[0]["RepoTags"] == [NAME]

        # Round trip: same digests after deleting and importing the export.
        await client.images.delete(NAME, sync=True)
        assert await client.transfer.import_archive(
            exported, ArchiveImportOptions(unpack=False)) == [NAME]
        assert (await client.images.get(NAME)).target.digest == image.digest

    # containerd 1.6's ctr exports client-side through the content service.
    theirs_path = workdir / "ctr.tar"
    ctrd.ctr("images", "export", str(theirs_path), NAME)
    theirs = _members(theirs_path)
    assert sorted(theirs) == sorted(ours)
    for name in ours:
        if name.startswith("blobs/"):
            assert ours[name] == theirs[name], name
    assert json.loads(theirs["index.json"]) == index
    assert json.loads(theirs["manifest.json"]) == docker


async def test_export_unknown_image_fails_cleanly(ctrd, workdir) -> None:
    target = workdir / "none.tar"
    async with AsyncClient(ctrd.address, namespace="default") as client:
        with pytest.raises(errors.NotFound):
            await client.transfer.export_archive(["example.com/not/there:v1"], target)
    assert not target.exists()


# ---- hostile and broken archives


def _tar(files: list[tuple[str, bytes]]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in files:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def _layout(image: writer.Image) -> list[tuple[str, bytes]]:
    with tempfile.TemporaryDirectory(dir="/var/tmp") as tmp:
        writer.write_oci_layout(tmp, {NAME: image})
        return [(str(p.relative_to(tmp)), p.read_bytes())
                for p in sorted(Path(tmp).rglob("*")) if p.is_file()]


def _without_layer(image: writer.Image) -> bytes:
    layer = image.layers[-1].blob.digest.split(":")[1]
    return _tar([(n, d) for n, d in _layout(image) if not n.endswith(layer)])


def _wrong_digest(image: writer.Image) -> bytes:
    layer = image.layers[-1].blob.digest.split(":")[1]
    return _tar([(n, b"not the layer" if n.endswith(layer) else d)
                 for n, d in _layout(image)])


def _truncated(image: writer.Image) -> bytes:
    data = _tar(_layout(image))
    return data[: len(data) // 2]


def _traversal(image: writer.Image) -> bytes:
    return _tar([("../../etc/evil", b"x"), *_layout(image)])


def _huge_index(image: writer.Image) -> bytes:
    # The header promises a 100 MiB index.json; it must be refused before it is read.
    layout = b'{"imageLayoutVersion":"1.0.0"}'
    first = tarfile.TarInfo("oci-layout")
    first.size = len(layout)
    index = tarfile.TarInfo("index.json")
    index.size = 100 << 20
    return (first.tobuf(format=tarfile.USTAR_FORMAT) + layout + bytes(-len(layout) % 512)
            + index.tobuf(format=tarfile.USTAR_FORMAT) + b"{" * 4096)


HOSTILE = {
    "not-a-tar": (lambda image: b"this is not a tar archive at all\n" * 64, "not a readable tar"),
    "empty": (lambda image: b"", "empty"),
    "truncated": (_truncated, "truncated"),
    "missing-blob": (_without_layer, "missing from the archive"),
    "wrong-digest": (_wrong_digest, "does not match its digest"),
    "path-traversal": (_traversal, "unsafe path"),
    "huge-index": (_huge_index, "over the limit"),
    "no-layout": (lambda image: _tar([("hello.txt", b"hi")]), "unrecognized image format"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
async def test_hostile_archives(ctrd, image, workdir, case) -> None:
    build, message = HOSTILE[case]
    data = build(image)
    async with AsyncClient(ctrd.address, namespace="default") as client:
        with pytest.raises(errors.CtrdError) as err:
            await client.transfer.import_archive(io.BytesIO(data))
        assert message in str(err.value), str(err.value)
        assert await client.images.list() == []
    assert _left_behind(ctrd) == ("", "")
