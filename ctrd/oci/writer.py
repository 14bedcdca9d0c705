"""Builds OCI and Docker images in memory and writes them in the forms `ctr` imports.

An image is assembled from the bottom up: layer tars (from a directory or from entries
given one by one, hostile ones included), compressed layers, a config naming their
diff IDs, a manifest, optionally an index over several platforms. The result is written
as an OCI image layout directory, an OCI archive, or a docker-archive (`docker save`).

Everything is reproducible: fixed timestamps unless asked otherwise, gzip without a
name or mtime, JSON in a stable order, so the same input gives the same digests.
"""
from __future__ import annotations

import enum
import io
import json
import os
import tarfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import zstandard
from isal import igzip

from ctrd.oci import digest, mediatypes
from ctrd.oci.descriptor import Platform

# 2000-01-01T00:00:00Z: a fixed, obviously synthetic time for entries and configs.
DEFAULT_MTIME = 946684800
DEFAULT_CREATED = "2000-01-01T00:00:00Z"
DEFAULT_PATH = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
WHITEOUT_PREFIX = ".wh."
OPAQUE_WHITEOUT = ".wh..wh..opq"


class Compression(enum.Enum):
    NONE = ""
    GZIP = "gzip"
    ZSTD = "zstd"

    def compress(self, data: bytes) -> bytes:
        if self is Compression.GZIP:
            return igzip.compress(data, mtime=0)
        if self is Compression.ZSTD:
            return zstandard.ZstdCompressor().compress(data)
        return data


# ---------------------------------------------------------------------------
# Layer tars


class EntryType(enum.Enum):
    FILE = tarfile.REGTYPE
    DIR = tarfile.DIRTYPE
    SYMLINK = tarfile.SYMTYPE
    HARDLINK = tarfile.LNKTYPE
    CHAR = tarfile.CHRTYPE
    BLOCK = tarfile.BLKTYPE
    FIFO = tarfile.FIFOTYPE


_DEFAULT_MODES = {EntryType.DIR: 0o755, EntryType.SYMLINK: 0o777}


@dataclass(frozen=True)
class TarEntry:
    """One member of a layer tar, written exactly as given.

    Paths are not cleaned or checked, so tests can build layers with ``..``,
    absolute paths, duplicate entries or links that point outside the rootfs.
    """

    path: str
    type: EntryType = EntryType.FILE
    data: bytes = b""
    mode: int | None = None  # None: 0o755 for dirs, 0o777 for symlinks, else 0o644
    uid: int = 0
    gid: int = 0
    linkname: str = ""
    devmajor: int = 0
    devminor: int = 0
    mtime: int = DEFAULT_MTIME
    uname: str = ""
    gname: str = ""
    # Extra PAX records, e.g. {"SCHILY.xattr.security.capability": ...}.
    pax: Mapping[str, str] = field(default_factory=dict)

    def tarinfo(self) -> tarfile.TarInfo:
        info = tarfile.TarInfo(self.path)
        info.type = self.type.value
        info.mode = _DEFAULT_MODES.get(self.type, 0o644) if self.mode is None else self.mode
        info.uid, info.gid = self.uid, self.gid
        info.uname, info.gname = self.uname, self.gname
        info.mtime = self.mtime
        info.linkname = self.linkname
        info.devmajor, info.devminor = self.devmajor, self.devminor
        info.size = len(self.data) if self.type is EntryType.FILE else 0
        info.pax_headers = dict(self.pax)
        return info


def file(path: str, data: bytes | str = b"", mode: int = 0o644, **kw: Any) -> TarEntry:
    if isinstance(data, str):
        data = data.encode()
    return TarEntry(path, EntryType.FILE, data, mode, **kw)


def directory(path: str, mode: int = 0o755, **kw: Any) -> TarEntry:
    return TarEntry(path, EntryType.DIR, mode=mode, **kw)


def symlink(path: str, target: str, **kw: Any) -> TarEntry:
    return TarEntry(path, EntryType.SYMLINK, linkname=target, **kw)


def hardlink(path: str, target: str, mode: int = 0o644, **kw: Any) -> TarEntry:
    """A hard link to ``target``, a path of an earlier entry of the same tar.

    Give it the target's mode: extractors apply a link's mode to the shared inode.
    """
    return TarEntry(path, EntryType.HARDLINK, mode=mode, linkname=target, **kw)


def char_device(path: str, major: int, minor: int, mode: int = 0o666, **kw: Any) -> TarEntry:
    return TarEntry(path, EntryType.CHAR, mode=mode, devmajor=major, devminor=minor, **kw)


def block_device(path: str, major: int, minor: int, mode: int = 0o660, **kw: Any) -> TarEntry:
    return TarEntry(path, EntryType.BLOCK, mode=mode, devmajor=major, devminor=minor, **kw)


def fifo(path: str, mode: int = 0o644, **kw: Any) -> TarEntry:
    return TarEntry(path, EntryType.FIFO, mode=mode, **kw)


def whiteout(path: str, **kw: Any) -> TarEntry:
    """The entry that deletes ``path`` of a lower layer."""
    parent, _, name = path.rstrip("/").rpartition("/")
    return file(f"{parent}/{WHITEOUT_PREFIX}{name}" if parent else WHITEOUT_PREFIX + name, **kw)


def opaque_whiteout(dirpath: str, **kw: Any) -> TarEntry:
    """The entry that hides everything lower layers hold under directory ``dirpath``."""
    return file(f"{dirpath.rstrip('/')}/{OPAQUE_WHITEOUT}", **kw)


def tar_entries(entries: Iterable[TarEntry], *, format: int = tarfile.PAX_FORMAT) -> bytes:
    """An uncompressed layer tar holding ``entries`` in the order given."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=format) as archive:
        for entry in entries:
            data = io.BytesIO(entry.data) if entry.type is EntryType.FILE else None
            archive.addfile(entry.tarinfo(), data)
    return buffer.getvalue()


def tar_directory(root: str | Path, *, mtime: int | None = DEFAULT_MTIME,
                  uid: int | None = 0, gid: int | None = 0) -> bytes:
    """An uncompressed layer tar of the tree under ``root`` (not root itself).

    Entries come in sorted order; hard links within the tree stay hard links;
    sockets are left out, as they are by containerd. ``mtime``, ``uid`` and ``gid``
    override what is on disk unless None.
    """
    root = Path(root)

    def normalize(info: tarfile.TarInfo) -> tarfile.TarInfo:
        if mtime is not None:
            info.mtime = mtime
        if uid is not None:
            info.uid, info.uname = uid, ""
        if gid is not None:
            info.gid, info.gname = gid, ""
        return info

    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as archive:
        for child in sorted(os.listdir(root)):
            archive.add(root / child, arcname=child, recursive=True, filter=normalize)
    return buffer.getvalue()


# ---------------------------------------------------------------------------
# Blobs and descriptors


def _json(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()


@dataclass(frozen=True)
class Blob:
    """A piece of content with its media type, as a descriptor points at it."""

    media_type: str
    data: bytes

    @cached_property
    def digest(self) -> str:
        return str(digest.of_bytes(self.data))

    @property
    def size(self) -> int:
        return len(self.data)

    def descriptor(self, *, annotations: Mapping[str, str] | None = None,
                   platform: Platform | None = None) -> dict[str, Any]:
        desc: dict[str, Any] = {
            "mediaType": self.media_type, "digest": self.digest, "size": self.size,
        }
        if annotations:
            desc["annotations"] = dict(annotations)
        if platform is not None:
            desc["platform"] = platform.to_json()
        return desc


@dataclass(frozen=True)
class Layer:
    blob: Blob
    diff_id: str  # digest of the uncompressed tar

    @property
    def compression(self) -> Compression:
        return Compression(mediatypes.layer_compression(self.blob.media_type))


def layer(tar: bytes | Iterable[TarEntry], compression: Compression = Compression.GZIP, *,
          docker: bool = False, nondistributable: bool = False,
          media_type: str | None = None) -> Layer:
    """A layer from an uncompressed tar (bytes) or from entries to put in one.

    ``media_type`` overrides the type chosen from the other arguments, to test how
    wrong or unknown types are handled.
    """
    if not isinstance(tar, bytes):
        tar = tar_entries(tar)
    kind = media_type or mediatypes.layer_type(
        compression.value, docker=docker, nondistributable=nondistributable
    )
    return Layer(Blob(kind, compression.compress(tar)), str(digest.of_bytes(tar)))


@dataclass(frozen=True)
class ImageConfig:
    """The runtime defaults an image config carries (its ``config`` object)."""

    cmd: Sequence[str] | None = None
    entrypoint: Sequence[str] | None = None
    env: Sequence[str] = (DEFAULT_PATH,)
    working_dir: str = ""
    user: str = ""
    labels: Mapping[str, str] = field(default_factory=dict)
    exposed_ports: Sequence[str] = ()
    volumes: Sequence[str] = ()
    stop_signal: str = ""

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"Env": list(self.env)}
        if self.cmd is not None:
            out["Cmd"] = list(self.cmd)
        if self.entrypoint is not None:
            out["Entrypoint"] = list(self.entrypoint)
        if self.working_dir:
            out["WorkingDir"] = self.working_dir
        if self.user:
            out["User"] = self.user
        if self.labels:
            out["Labels"] = dict(self.labels)
        if self.exposed_ports:
            out["ExposedPorts"] = {port: {} for port in self.exposed_ports}
        if self.volumes:
            out["Volumes"] = {volume: {} for volume in self.volumes}
        if self.stop_signal:
            out["StopSignal"] = self.stop_signal
        return out


@dataclass(frozen=True)
class History:
    created_by: str = ""
    comment: str = ""
    empty_layer: bool = False
    created: str = DEFAULT_CREATED

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"created": self.created}
        if self.created_by:
            out["created_by"] = self.created_by
        if self.comment:
            out["comment"] = self.comment
        if self.empty_layer:
            out["empty_layer"] = True
        return out


def config_blob(layers: Sequence[Layer], config: ImageConfig, *, platform: Platform,
                history: Sequence[History] | None = None, docker: bool = False,
                created: str = DEFAULT_CREATED) -> Blob:
    if history is None:
        history = [History(created_by=f"ctrd.oci layer {i}") for i in range(len(layers))]
    body: dict[str, Any] = {"created": created, **platform.to_json()}
    body["config"] = config.to_json()
    body["rootfs"] = {"type": "layers", "diff_ids": [layer.diff_id for layer in layers]}
    body["history"] = [h.to_json() for h in history]
    return Blob(mediatypes.DOCKER_CONFIG if docker else mediatypes.OCI_CONFIG, _json(body))


def manifest_blob(config: Blob, layers: Sequence[Layer], *, docker: bool = False,
                  annotations: Mapping[str, str] | None = None) -> Blob:
    body: dict[str, Any] = {
        "schemaVersion": 2,
        "mediaType": mediatypes.DOCKER_MANIFEST if docker else mediatypes.OCI_MANIFEST,
        "config": config.descriptor(),
        "layers": [layer.blob.descriptor() for layer in layers],
    }
    if annotations:
        body["annotations"] = dict(annotations)
    return Blob(body["mediaType"], _json(body))


@dataclass(frozen=True)
class Image:
    """An image ready to write: its root (manifest or index) and every blob under it."""

    root: Blob
    blobs: tuple[Blob, ...]  # the root included, each digest once
    platform: Platform | None = None  # for a single-platform image
    layers: tuple[Layer, ...] = ()  # for a single-platform image, bottom first
    config: Blob | None = None  # for a single-platform image

    @property
    def digest(self) -> str:
        return self.root.digest

    @property
    def is_index(self) -> bool:
        return mediatypes.is_index(self.root.media_type)


def _unique(blobs: Iterable[Blob]) -> tuple[Blob, ...]:
    seen: dict[str, Blob] = {}
    for blob in blobs:
        seen.setdefault(blob.digest, blob)
    return tuple(seen.values())


def build_image(layers: Sequence[Layer], config: ImageConfig = ImageConfig(), *,
                platform: Platform | None = None, docker: bool = False,
                history: Sequence[History] | None = None, created: str = DEFAULT_CREATED,
                annotations: Mapping[str, str] | None = None) -> Image:
    """A single-platform image: config and manifest over ``layers`` (bottom first)."""
    platform = platform or Platform.host()
    cfg = config_blob(layers, config, platform=platform, history=history, docker=docker,
                      created=created)
    manifest = manifest_blob(cfg, layers, docker=docker, annotations=annotations)
    blobs = _unique([manifest, cfg, *(layer.blob for layer in layers)])
    return Image(manifest, blobs, platform, tuple(layers), cfg)


def build_index(images: Sequence[Image], *, docker: bool = False,
                annotations: Mapping[str, str] | None = None) -> Image:
    """An index (manifest list) over single-platform images."""
    entries = []
    for image in images:
        if image.platform is None:
            raise ValueError("an index can only hold single-platform images")
        entries.append(image.root.descriptor(platform=image.platform))
    body: dict[str, Any] = {
        "schemaVersion": 2,
        "mediaType": mediatypes.DOCKER_MANIFEST_LIST if docker else mediatypes.OCI_INDEX,
        "manifests": entries,
    }
    if annotations:
        body["annotations"] = dict(annotations)
    root = Blob(body["mediaType"], _json(body))
    return Image(root, _unique([root, *(b for image in images for b in image.blobs)]))


# ---------------------------------------------------------------------------
# Output formats


def _split_tag(name: str) -> tuple[str, str]:
    """(repository, tag) of ``name``; the tag is "latest" when there is none."""
    colon = name.rfind(":")
    if colon > name.rfind("/"):
        return name[:colon], name[colon + 1:]
    return name, "latest"


def oci_ref_name(name: str) -> str:
    """What goes in ``org.opencontainers.image.ref.name``: the tag (or digest) alone,
    as containerd puts it; a name with neither is kept whole.
    """
    if "@" in name:
        return name[name.index("@") + 1:]
    repo, tag = _split_tag(name)
    return tag if repo != name else name


def _name_annotations(name: str) -> dict[str, str]:
    return {mediatypes.ANNOTATION_IMAGE_NAME: name,
            mediatypes.ANNOTATION_REF_NAME: oci_ref_name(name)}


def _layout_files(images: Mapping[str, Image]) -> list[tuple[str, bytes]]:
    """The (path, content) files of an OCI image layout holding ``images`` by name."""
    index = {
        "schemaVersion": 2,
        "mediaType": mediatypes.OCI_INDEX,
        "manifests": [image.root.descriptor(annotations=_name_annotations(name))
                      for name, image in images.items()],
    }
    files = [("oci-layout", _json({"imageLayoutVersion": mediatypes.OCI_LAYOUT_VERSION}))]
    for blob in _unique(b for image in images.values() for b in image.blobs):
        algorithm, _, hexpart = blob.digest.partition(":")
        files.append((f"blobs/{algorithm}/{hexpart}", blob.data))
    files.append(("index.json", _json(index)))
    return files


def write_oci_layout(path: str | Path, images: Mapping[str, Image]) -> None:
    """Write an OCI image layout directory (``oci:DIR`` to skopeo) holding ``images``."""
    root = Path(path)
    for relpath, data in _layout_files(images):
        target = root / relpath
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)


def _write_tar(path: str | Path, files: Iterable[tuple[str, bytes]]) -> None:
    directories: set[str] = set()
    with tarfile.open(path, mode="w", format=tarfile.PAX_FORMAT) as archive:
        for relpath, data in files:
            parts = relpath.split("/")[:-1]
            for depth in range(1, len(parts) + 1):
                parent = "/".join(parts[:depth])
                if parent not in directories:
                    directories.add(parent)
                    archive.addfile(directory(parent + "/").tarinfo())
            archive.addfile(file(relpath, data).tarinfo(), io.BytesIO(data))


def write_oci_archive(path: str | Path, images: Mapping[str, Image]) -> None:
    """Write an OCI archive (a tar of an OCI layout), as `ctr images import` reads it."""
    _write_tar(path, _layout_files(images))


def write_docker_archive(path: str | Path, images: Mapping[str, Image]) -> None:
    """Write a tar in `docker save` form: manifest.json, repositories, one dir per layer.

    Layers are stored uncompressed, as docker does. Names should carry a tag
    (``repo:tag``); multi-platform images cannot be written in this format.
    """
    files: dict[str, bytes] = {}
    manifest = []
    repositories: dict[str, dict[str, str]] = {}
    for name, image in images.items():
        if image.config is None:
            raise ValueError(f"{name}: a docker archive holds single-platform images only")
        config_hex = image.config.digest.partition(":")[2]
        files[f"{config_hex}.json"] = image.config.data
        layer_paths = []
        parent = ""
        for item in image.layers:
            # Docker names layer directories by a v1 ID chained over the layers below.
            layer_id = digest.of_bytes(f"{parent} {item.diff_id}".encode()).hex
            tar = _decompress(item)
            files[f"{layer_id}/layer.tar"] = tar
            files[f"{layer_id}/VERSION"] = b"1.0"
            v1: dict[str, Any] = {"id": layer_id, "created": DEFAULT_CREATED}
            if parent:
                v1["parent"] = parent
            files[f"{layer_id}/json"] = _json(v1)
            layer_paths.append(f"{layer_id}/layer.tar")
            parent = layer_id
        manifest.append({"Config": f"{config_hex}.json", "RepoTags": [name],
                         "Layers": layer_paths})
        repo, tag = _split_tag(name)
        repositories.setdefault(repo, {})[tag] = parent
    files["manifest.json"] = _json(manifest)
    files["repositories"] = _json(repositories)
    _write_tar(path, files.items())


def _decompress(item: Layer) -> bytes:
    data = item.blob.data
    if item.compression is Compression.GZIP:
        return igzip.decompress(data)
    if item.compression is Compression.ZSTD:
        return zstandard.ZstdDecompressor().decompressobj().decompress(data)
    return data

