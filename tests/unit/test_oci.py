"""Tests of ctrd.oci: digests, media types, and the image writer's output."""
from __future__ import annotations

import gzip
import io
import json
import os
import tarfile
from pathlib import Path

import pytest
import zstandard

from ctrd.errors import InvalidArgument
from ctrd.oci import busybox, digest, mediatypes, writer
from ctrd.oci.writer import Compression, ImageConfig, Platform

SHA = "sha256:" + "a" * 64


# --- digest -------------------------------------------------------------------

@pytest.mark.parametrize("text", [SHA, "sha384:" + "0" * 96, "sha512:" + "f" * 128])
def test_digest_valid(text: str) -> None:
    d = digest.Digest.parse(text)
    assert str(d) == text
    assert digest.is_valid(text)


@pytest.mark.parametrize(
    "text,why",
    [
        ("", "format"), ("sha256", "format"), ("sha256:", "format"), (":" + "a" * 64, "format"),
        ("SHA256:" + "a" * 64, "format"), ("sha256:" + "A" * 64, "format"),
        ("sha256:" + "g" * 64, "format"), ("sha256:" + "a" * 63, "length"),
        ("sha256:" + "a" * 65, "length"), ("md5:" + "a" * 32, "unsupported"),
        ("sha256:" + "a" * 64 + "\n", "format"), (" sha256:" + "a" * 64, "format"),
        ("sha256:../../etc/passwd", "format"),
    ],
)
def test_digest_invalid(text: str, why: str) -> None:
    with pytest.raises(InvalidArgument, match=why):
        digest.Digest.parse(text)
    assert not digest.is_valid(text)


def test_digest_helpers(tmp_path: Path) -> None:
    data = b"hello\n"
    expected = "sha256:5891b5b522d5df086d0ff0b110fbd9d21bb4fc7163af34d08286a2e846f6be03"
    assert str(digest.of_bytes(data)) == expected
    path = tmp_path / "f"
    path.write_bytes(data)
    assert digest.of_file(path) == (digest.Digest.parse(expected), 6)
    assert digest.of_stream(io.BytesIO(data), "sha512")[0].algorithm == "sha512"
    assert digest.Digest.parse(expected).hasher().name == "sha256"
    with pytest.raises(InvalidArgument):
        digest.of_bytes(data, "md5")


# --- media types --------------------------------------------------------------

def test_mediatypes() -> None:
    assert mediatypes.is_index(mediatypes.OCI_INDEX)
    assert mediatypes.is_index(mediatypes.DOCKER_MANIFEST_LIST)
    assert mediatypes.is_manifest(mediatypes.DOCKER_MANIFEST + "; charset=utf-8")
    assert mediatypes.is_config(mediatypes.OCI_CONFIG)
    assert mediatypes.is_layer(mediatypes.DOCKER_LAYER_FOREIGN_GZIP)
    assert mediatypes.is_nondistributable(mediatypes.OCI_LAYER_NONDISTRIBUTABLE_ZSTD)
    assert not mediatypes.is_nondistributable(mediatypes.OCI_LAYER_GZIP)
    assert mediatypes.layer_compression(mediatypes.OCI_LAYER_ZSTD) == "zstd"
    assert mediatypes.layer_compression(mediatypes.DOCKER_LAYER_GZIP) == "gzip"
    assert mediatypes.layer_compression(mediatypes.OCI_LAYER) == ""
    assert mediatypes.layer_compression(mediatypes.OCI_CONFIG) is None
    assert mediatypes.layer_type("gzip", docker=True) == mediatypes.DOCKER_LAYER_GZIP
    assert mediatypes.layer_type("", nondistributable=True) == \
        mediatypes.OCI_LAYER_NONDISTRIBUTABLE
    with pytest.raises(ValueError):
        mediatypes.layer_type("zstd", docker=True, nondistributable=True)


# --- layer tars ---------------------------------------------------------------

def _members(tar: bytes) -> dict[str, tarfile.TarInfo]:
    with tarfile.open(fileobj=io.BytesIO(tar), mode="r:") as archive:
        return {m.name: m for m in archive.getmembers()}


def test_entries_written_verbatim_including_hostile_ones() -> None:
    entries = [
        writer.directory("etc/"),
        writer.file("etc/x", "data", 0o4755, uid=1000, gid=1001),
        writer.symlink("etc/escape", "../../../../etc/shadow"),
        writer.hardlink("etc/hl", "etc/x", 0o4755),
        writer.char_device("dev/null", 1, 3),
        writer.block_device("dev/sda", 8, 0),
        writer.fifo("run/pipe"),
        writer.file("../outside", "x"),
        writer.file("/abs/path", "x"),
        writer.file("etc/x", "duplicate"),
        writer.whiteout("etc/passwd"),
        writer.whiteout("top"),
        writer.opaque_whiteout("var/lib/"),
        writer.file("long/" + "n" * 200, "x"),
        writer.file("caps", "x", pax={"SCHILY.xattr.user.test": "v"}),
    ]
    tar = writer.tar_entries(entries)
    with tarfile.open(fileobj=io.BytesIO(tar), mode="r:") as archive:
        members = archive.getmembers()
        names = [m.name for m in members]
        assert names == [e.path.rstrip("/") for e in entries]
        by = {}
        for m in members:
            by.setdefault(m.name, m)
        x = by["etc/x"]
        assert (x.mode, x.uid, x.gid, x.mtime) == (0o4755, 1000, 1001, writer.DEFAULT_MTIME)
        assert archive.extractfile(x).read() == b"data"
        assert by["etc/escape"].issym() and by["etc/escape"].linkname == "../../../../etc/shadow"
        assert by["etc/hl"].islnk() and by["etc/hl"].linkname == "etc/x"
        assert by["dev/null"].ischr() and (by["dev/null"].devmajor, by["dev/null"].devminor) == (1, 3)
        assert by["dev/sda"].isblk()
        assert by["run/pipe"].isfifo()
        assert "../outside" in by and "/abs/path" in by
        assert names.count("etc/x") == 2
        assert "etc/.wh.passwd" in by and ".wh.top" in by and "var/lib/.wh..wh..opq" in by
        assert "long/" + "n" * 200 in by
        assert by["caps"].pax_headers["SCHILY.xattr.user.test"] == "v"


def test_tar_directory_keeps_hardlinks_and_types(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "a" / "b").mkdir(parents=True)
    (root / "a" / "file").write_text("x")
    os.link(root / "a" / "file", root / "a" / "link")
    os.symlink("file", root / "a" / "sym")
    os.mkfifo(root / "fifo")
    os.chmod(root / "a" / "file", 0o751)
    members = _members(writer.tar_directory(root))
    assert list(members) == ["a", "a/b", "a/file", "a/link", "a/sym", "fifo"]
    assert members["a/link"].islnk() and members["a/link"].linkname == "a/file"
    assert members["a/sym"].issym()
    assert members["a/file"].mode & 0o777 == 0o751
    assert all(m.mtime == writer.DEFAULT_MTIME and m.uid == 0 for m in members.values())


@pytest.mark.parametrize("compression", list(Compression))
def test_layer_compression_and_diff_id(compression: Compression) -> None:
    tar = writer.tar_entries([writer.file("a", "b" * 1000)])
    layer = writer.layer(tar, compression)
    assert layer.diff_id == str(digest.of_bytes(tar))
    assert layer.compression is compression
    data = layer.blob.data
    if compression is Compression.GZIP:
        assert gzip.decompress(data) == tar
        assert data[4:8] == b"\0\0\0\0"  # no mtime: reproducible
    elif compression is Compression.ZSTD:
        assert zstandard.ZstdDecompressor().decompressobj().decompress(data) == tar
    else:
        assert data == tar
    assert layer.blob.digest == str(digest.of_bytes(data))


def test_layer_media_type_choices() -> None:
    entries = [writer.file("a")]
    assert writer.layer(entries, docker=True).blob.media_type == mediatypes.DOCKER_LAYER_GZIP
    assert writer.layer(entries, nondistributable=True).blob.media_type == \
        mediatypes.OCI_LAYER_NONDISTRIBUTABLE_GZIP
    assert writer.layer(entries, media_type="application/x-bogus").blob.media_type == \
        "application/x-bogus"


# --- config, manifest, index --------------------------------------------------

def test_image_json_is_consistent() -> None:
    config = ImageConfig(cmd=["sh"], entrypoint=["/bin/tini", "--"], env=["A=1"],
                         working_dir="/w", user="1:2", labels={"l": "v"},
                         exposed_ports=["80/tcp"], volumes=["/data"], stop_signal="SIGINT")
    layers = [writer.layer([writer.file("a", "1")]), writer.layer([writer.file("b", "2")])]
    image = writer.build_image(layers, config, platform=Platform("linux", "arm64", "v8"))
    manifest = json.loads(image.root.data)
    assert manifest["schemaVersion"] == 2 and manifest["mediaType"] == mediatypes.OCI_MANIFEST
    assert image.config is not None
    assert manifest["config"] == {"mediaType": mediatypes.OCI_CONFIG,
                                  "digest": image.config.digest, "size": image.config.size}
    assert [l["digest"] for l in manifest["layers"]] == [l.blob.digest for l in layers]
    cfg = json.loads(image.config.data)
    assert (cfg["os"], cfg["architecture"], cfg["variant"]) == ("linux", "arm64", "v8")
    assert cfg["rootfs"] == {"type": "layers", "diff_ids": [l.diff_id for l in layers]}
    assert len(cfg["history"]) == 2
    assert cfg["config"] == {
        "Env": ["A=1"], "Cmd": ["sh"], "Entrypoint": ["/bin/tini", "--"], "WorkingDir": "/w",
        "User": "1:2", "Labels": {"l": "v"}, "ExposedPorts": {"80/tcp": {}},
        "Volumes": {"/data": {}}, "StopSignal": "SIGINT",
    }
    assert {b.digest for b in image.blobs} == {image.root.digest, image.config.digest,
                                               *(l.blob.digest for l in layers)}


def test_docker_image_types() -> None:
    image = writer.build_image([writer.layer([writer.file("a")], docker=True)], docker=True)
    manifest = json.loads(image.root.data)
    assert manifest["mediaType"] == mediatypes.DOCKER_MANIFEST
    assert manifest["config"]["mediaType"] == mediatypes.DOCKER_CONFIG


def test_build_is_reproducible() -> None:
    assert busybox.busybox_image().digest == busybox.busybox_image().digest


def test_index_and_multi_platform() -> None:
    other = Platform("linux", "s390x")
    image = busybox.multi_platform_image([Platform.host(), other])
    index = json.loads(image.root.data)
    assert image.is_index and index["mediaType"] == mediatypes.OCI_INDEX
    assert [m["platform"] for m in index["manifests"]] == [Platform.host().to_json(),
                                                           other.to_json()]
    blobs = {b.digest for b in image.blobs}
    assert all(m["digest"] in blobs for m in index["manifests"])
    with pytest.raises(ValueError):
        writer.build_index([image])


# --- output formats -----------------------------------------------------------

def test_oci_ref_name() -> None:
    assert writer.oci_ref_name("docker.io/library/busybox:1.36") == "1.36"
    assert writer.oci_ref_name("localhost:5000/x") == "localhost:5000/x"
    assert writer.oci_ref_name("localhost:5000/x:t") == "t"
    assert writer.oci_ref_name("x@" + SHA) == SHA


def _check_layout(files: dict[str, bytes], images: dict[str, writer.Image]) -> None:
    assert json.loads(files["oci-layout"]) == {"imageLayoutVersion": "1.0.0"}
    index = json.loads(files["index.json"])
    assert [m["annotations"][mediatypes.ANNOTATION_IMAGE_NAME] for m in index["manifests"]] \
        == list(images)
    for name, image in images.items():
        for blob in image.blobs:
            assert files["blobs/sha256/" + blob.digest.split(":")[1]] == blob.data


def test_oci_layout_and_archive(tmp_path: Path) -> None:
    images = {"docker.io/library/a:1": busybox.busybox_image(),
              "docker.io/library/b:latest": busybox.busybox_image(compression=Compression.ZSTD)}
    writer.write_oci_layout(tmp_path / "layout", images)
    files = {str(p.relative_to(tmp_path / "layout")): p.read_bytes()
             for p in (tmp_path / "layout").rglob("*") if p.is_file()}
    _check_layout(files, images)
    index = json.loads(files["index.json"])
    assert index["manifests"][0]["annotations"][mediatypes.ANNOTATION_REF_NAME] == "1"

    writer.write_oci_archive(tmp_path / "a.tar", images)
    with tarfile.open(tmp_path / "a.tar") as archive:
        members = archive.getmembers()
        files = {m.name: archive.extractfile(m).read() for m in members if m.isfile()}
        assert {m.name for m in members if m.isdir()} == {"blobs", "blobs/sha256"}
    _check_layout(files, images)


def test_docker_archive(tmp_path: Path) -> None:
    image = busybox.busybox_image(docker=True, extra_layers=[[writer.file("x", "y")]])
    writer.write_docker_archive(tmp_path / "d.tar", {"busybox:test": image})
    with tarfile.open(tmp_path / "d.tar") as archive:
        files = {m.name: archive.extractfile(m).read() for m in archive.getmembers()
                 if m.isfile()}
    (entry,) = json.loads(files["manifest.json"])
    assert entry["RepoTags"] == ["busybox:test"]
    assert image.config is not None
    assert files[entry["Config"]] == image.config.data
    assert [str(digest.of_bytes(files[p])) for p in entry["Layers"]] == \
        [l.diff_id for l in image.layers]
    top = entry["Layers"][-1].split("/")[0]
    assert json.loads(files["repositories"]) == {"busybox": {"test": top}}
    with pytest.raises(ValueError):
        writer.write_docker_archive(tmp_path / "m.tar", {"m:1": busybox.multi_platform_image(
            [Platform.host()])})


def test_busybox_rootfs() -> None:
    entries = {e.path: e for e in busybox.rootfs_entries()}
    assert entries["bin/busybox"].mode == 0o755
    assert entries["bin/sh"].type is writer.EntryType.HARDLINK
    assert entries["bin/sh"].mode == 0o755  # a link's mode lands on the shared inode
    assert entries["tmp/"].mode == 0o1777
    assert "root:x:0:0:" in entries["etc/passwd"].data.decode()
    for d in ("proc/", "sys/", "dev/"):
        assert entries[d].type is writer.EntryType.DIR
    sym = {e.path: e for e in busybox.rootfs_entries(links="sym")}
    assert sym["bin/ls"].type is writer.EntryType.SYMLINK and sym["bin/ls"].linkname == "busybox"
    config = json.loads(busybox.busybox_image().config.data)  # type: ignore[union-attr]
    assert config["config"]["Cmd"] == ["sh"]
