"""ctrd.client.archive and unpack: importing archives and unpacking, against fakes of
the content, images, snapshots and diff services."""
from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import pytest

from ctrd import errors
from ctrd.client.archive import Importer
from ctrd.client.images import Image, Images, ResolvedImage
from ctrd.client.types import Descriptor, Mount, Platform
from ctrd.client.unpack import chain_ids, unpack
from ctrd.oci import busybox, mediatypes, writer


class FakeContent:
    def __init__(self) -> None:
        self.blobs: dict[str, bytes] = {}
        self.labels: dict[str, dict[str, str]] = {}

    async def write(self, ref, data, *, expected="", total=0, labels=None) -> str:
        if isinstance(data, bytes):
            body = data
        else:
            body = b"".join([chunk async for chunk in data])
        digest = "sha256:" + hashlib.sha256(body).hexdigest()
        if expected and expected != digest:
            raise errors.FailedPrecondition(f"digest mismatch {expected} != {digest}")
        self.blobs[digest] = body
        self.labels.setdefault(digest, {}).update(labels or {})
        return digest

    async def read(self, digest: str, *, limit: int = 0) -> bytes:
        try:
            return self.blobs[digest]
        except KeyError:
            raise errors.NotFound(digest) from None

    async def set_labels(self, digest: str, labels: dict[str, str]) -> None:
        self.labels.setdefault(digest, {}).update(labels)


class FakeImages(Images):
    def __init__(self, content: FakeContent) -> None:
        self._content = content  # type: ignore[assignment]
        self.records: dict[str, Image] = {}

    async def put(self, image: Image) -> Image:
        self.records[image.name] = image
        return image


def importer() -> tuple[Importer, FakeContent, FakeImages]:
    content = FakeContent()
    images = FakeImages(content)
    return Importer(content, images), content, images  # type: ignore[arg-type]


async def test_import_oci_archive(tmp_path: Path) -> None:
    image = busybox.busybox_image()
    writer.write_oci_archive(tmp_path / "a.tar", {"docker.io/library/busybox:1": image})
    imp, content, images = importer()
    result = await imp.import_file(tmp_path / "a.tar")
    assert [i.name for i in result.images] == ["docker.io/library/busybox:1"]
    assert images.records["docker.io/library/busybox:1"].target.digest == image.digest
    assert set(content.blobs) == {b.digest for b in image.blobs}
    # The manifest names its children for the garbage collector.
    labels = content.labels[image.digest]
    assert labels["containerd.io/gc.ref.content.config"] == image.config.digest
    assert labels["containerd.io/gc.ref.content.l.0"] == image.layers[0].blob.digest


async def test_import_index_labels_manifests(tmp_path: Path) -> None:
    index = busybox.multi_platform_image([writer.Platform.host(),
                                          writer.Platform("linux", "s390x")])
    writer.write_oci_archive(tmp_path / "a.tar", {"example.com/multi:v1": index})
    imp, content, images = importer()
    await imp.import_file(tmp_path / "a.tar")
    labels = content.labels[index.digest]
    assert {"containerd.io/gc.ref.content.m.0", "containerd.io/gc.ref.content.m.1"} <= set(labels)
    resolved = await images.resolve(images.records["example.com/multi:v1"], Platform.host())
    assert resolved.diff_ids and resolved.layers


async def test_import_docker_archive(tmp_path: Path) -> None:
    image = busybox.busybox_image(docker=True)
    writer.write_docker_archive(tmp_path / "d.tar", {"busybox:latest": image})
    imp, content, images = importer()
    result = await imp.import_file(tmp_path / "d.tar")
    assert [i.name for i in result.images] == ["docker.io/library/busybox:latest"]
    target = result.images[0].target
    assert target.media_type == mediatypes.DOCKER_MANIFEST
    manifest = json.loads(content.blobs[target.digest])
    # docker save stores layers uncompressed; the manifest says so.
    assert manifest["layers"][0]["mediaType"] == mediatypes.DOCKER_LAYER
    resolved = await images.resolve(result.images[0])
    assert resolved.diff_ids == [image.layers[0].diff_id]
    assert manifest["layers"][0]["digest"] == image.layers[0].diff_id


async def test_tag_only_names_need_a_base_name(tmp_path: Path) -> None:
    image = busybox.busybox_image()
    layout = tmp_path / "layout"
    writer.write_oci_layout(layout, {"x:v3": image})
    index = json.loads((layout / "index.json").read_text())
    del index["manifests"][0]["annotations"][mediatypes.ANNOTATION_IMAGE_NAME]
    (layout / "index.json").write_text(json.dumps(index))
    with tarfile.open(tmp_path / "a.tar", "w") as tar:
        tar.add(layout, arcname=".")
    imp, _, _ = importer()
    result = await imp.import_file(tmp_path / "a.tar")
    assert result.images == [] and result.unnamed == [image.digest]
    result = await imp.import_file(tmp_path / "a.tar", base_name="example.com/app")
    assert [i.name for i in result.images] == ["example.com/app:v3"]


def _tar(path: Path, files: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


@pytest.mark.parametrize("files", [
    {"hello.txt": b"hi"},                                          # neither format
    {"index.json": b"{not json"},                                   # bad JSON
    {"index.json": b"[]"},                                          # wrong shape
    {"index.json": json.dumps({"manifests": [{"digest": "sha256:../../etc/passwd",
                                              "mediaType": mediatypes.OCI_MANIFEST}]}).encode()},
    {"index.json": json.dumps({"manifests": [{"digest": "sha256:" + "0" * 64, "size": 1,
                                              "mediaType": mediatypes.OCI_MANIFEST}]}).encode()},
    {"manifest.json": b"{}"},
    {"manifest.json": json.dumps([{"Config": "missing.json", "Layers": []}]).encode()},
])
async def test_hostile_archives_are_invalid(tmp_path: Path, files: dict[str, bytes]) -> None:
    imp, _, _ = importer()
    with pytest.raises(errors.InvalidArgument):
        await imp.import_file(_tar(tmp_path / "bad.tar", files))


async def test_not_a_tar(tmp_path: Path) -> None:
    (tmp_path / "x.tar").write_bytes(b"\x00" * 10)
    imp, _, _ = importer()
    with pytest.raises(errors.InvalidArgument):
        await imp.import_file(tmp_path / "x.tar")


def test_chain_ids() -> None:
    a, b = "sha256:" + "a" * 64, "sha256:" + "b" * 64
    expected = "sha256:" + hashlib.sha256(f"{a} {b}".encode()).hexdigest()
    assert chain_ids([a, b]) == [a, expected]
    assert chain_ids([]) == []


class FakeSnapshots:
    snapshotter = "overlayfs"

    def __init__(self) -> None:
        self.committed: dict[str, str] = {}
        self.active: dict[str, str] = {}
        self.removed: list[str] = []

    async def stat(self, key: str):
        if key not in self.committed:
            raise errors.NotFound(key)

    async def prepare(self, key: str, parent: str = "") -> list[Mount]:
        self.active[key] = parent
        return [Mount("bind", f"/fake/{key}")]

    async def commit(self, name: str, key: str) -> None:
        self.committed[name] = self.active.pop(key)

    async def remove(self, key: str) -> None:
        self.active.pop(key, None)
        self.removed.append(key)


class FakeDiff:
    def __init__(self, diff_ids: dict[str, str]) -> None:
        self.diff_ids = diff_ids
        self.applied: list[str] = []

    async def apply(self, layer: Descriptor, mounts: list[Mount]) -> Descriptor:
        self.applied.append(layer.digest)
        return Descriptor(mediatypes.OCI_LAYER, self.diff_ids[layer.digest], 0)


def _resolved(n: int) -> ResolvedImage:
    layers = tuple(Descriptor(mediatypes.OCI_LAYER_GZIP, f"sha256:{i:064x}", 10) for i in range(n))
    diff_ids = [f"sha256:{i + 100:064x}" for i in range(n)]
    config = Descriptor(mediatypes.OCI_CONFIG, "sha256:" + "c" * 64, 5)
    return ResolvedImage(Image("x", config), config, config, {"rootfs": {"diff_ids": diff_ids}},
                         layers)


async def test_unpack_commits_each_layer_once() -> None:
    resolved = _resolved(3)
    snaps, content = FakeSnapshots(), FakeContent()
    diff = FakeDiff({d.digest: i for d, i in zip(resolved.layers, resolved.diff_ids)})
    top = await unpack(resolved, snaps, diff, content)  # type: ignore[arg-type]
    chain = chain_ids(resolved.diff_ids)
    assert top == chain[-1]
    assert snaps.committed == {chain[0]: "", chain[1]: chain[0], chain[2]: chain[1]}
    assert content.labels[resolved.config_descriptor.digest] == {
        "containerd.io/gc.ref.snapshot.overlayfs": top}
    # A second unpack finds everything in place and applies nothing.
    diff.applied.clear()
    assert await unpack(resolved, snaps, diff, content) == top  # type: ignore[arg-type]
    assert diff.applied == []


async def test_unpack_rejects_wrong_diff_id() -> None:
    resolved = _resolved(1)
    snaps = FakeSnapshots()
    diff = FakeDiff({resolved.layers[0].digest: "sha256:" + "e" * 64})
    with pytest.raises(errors.FailedPrecondition):
        await unpack(resolved, snaps, diff, FakeContent())  # type: ignore[arg-type]
    assert not snaps.committed and not snaps.active and snaps.removed


async def test_unpack_rejects_layer_count_mismatch() -> None:
    resolved = _resolved(2)
    broken = ResolvedImage(resolved.image, resolved.manifest, resolved.config_descriptor,
                           {"rootfs": {"diff_ids": resolved.diff_ids[:1]}}, resolved.layers)
    with pytest.raises(errors.FailedPrecondition):
        await unpack(broken, FakeSnapshots(), FakeDiff({}), FakeContent())  # type: ignore[arg-type]
