"""Importing image archives (OCI layout tars and `docker save` tars) through the
content and images services, as `ctr images import` does: the client reads the
archive, the daemon only stores blobs and names.
"""
from __future__ import annotations

import asyncio
import json
import secrets
import tarfile
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from ctrd import errors, reference
from ctrd.oci import mediatypes

from .content import CHUNK, Content
from .images import Image, Images
from .types import Descriptor

GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
# Manifests, indexes and configs are small; a larger one is hostile or broken.
JSON_LIMIT = 8 << 20
MAX_DEPTH = 8


@dataclass
class ImportResult:
    images: list[Image] = field(default_factory=list)
    # Root digests that had no usable name; pass a base name to import them.
    unnamed: list[str] = field(default_factory=list)


class Archive:
    """Random access to the members of an image tar, by normalised path."""

    def __init__(self, path: str | Path) -> None:
        try:
            self._tar = tarfile.open(path, mode="r:*")
        except (OSError, tarfile.TarError) as exc:
            raise errors.InvalidArgument(f"{path}: not a readable tar archive: {exc}") from None
        self._members = {_clean(m.name): m for m in self._tar.getmembers() if m.isfile()}

    def close(self) -> None:
        self._tar.close()

    def has(self, name: str) -> bool:
        return _clean(name) in self._members

    def size(self, name: str) -> int:
        return self._member(name).size

    def _member(self, name: str) -> tarfile.TarInfo:
        try:
            return self._members[_clean(name)]
        except KeyError:
            raise errors.InvalidArgument(f"archive has no file {name!r}") from None

    def open(self, name: str) -> IO[bytes]:
        handle = self._tar.extractfile(self._member(name))
        if handle is None:
            raise errors.InvalidArgument(f"archive member {name!r} is not a file")
        return handle

    def read_json(self, name: str) -> Any:
        if self.size(name) > JSON_LIMIT:
            raise errors.InvalidArgument(f"archive file {name!r} is too large for JSON")
        try:
            return json.loads(self.open(name).read())
        except ValueError as exc:
            raise errors.InvalidArgument(f"archive file {name!r}: bad JSON: {exc}") from None

    async def chunks(self, name: str) -> AsyncIterator[bytes]:
        handle = self.open(name)
        while chunk := await asyncio.to_thread(handle.read, CHUNK):
            yield chunk


def _clean(name: str) -> str:
    while name.startswith("./"):
        name = name[2:]
    return name.lstrip("/")


def _blob_path(digest: str) -> str:
    algorithm, _, encoded = digest.partition(":")
    if not algorithm or not encoded or "/" in digest or ".." in digest:
        raise errors.InvalidArgument(f"invalid digest {digest!r} in archive")
    return f"blobs/{algorithm}/{encoded}"


class Importer:
    def __init__(self, content: Content, images: Images) -> None:
        self._content = content
        self._images = images

    async def import_file(self, path: str | Path, *, base_name: str = "") -> ImportResult:
        archive = await asyncio.to_thread(Archive, path)
        try:
            if archive.has("index.json"):
                return await self._import_oci(archive, base_name)
            if archive.has("manifest.json"):
                return await self._import_docker(archive)
            raise errors.InvalidArgument(
                f"{path}: neither an OCI archive (index.json) nor a docker archive "
                f"(manifest.json)")
        finally:
            archive.close()

    # -- OCI layout -------------------------------------------------------------

    async def _import_oci(self, archive: Archive, base_name: str) -> ImportResult:
        index = archive.read_json("index.json")
        if not isinstance(index, dict) or not isinstance(index.get("manifests"), list):
            raise errors.InvalidArgument("index.json: no manifests list")
        result = ImportResult()
        for entry in index["manifests"]:
            desc = _descriptor(entry)
            await self._store_tree(archive, desc, depth=0)
            name = _oci_name(desc.annotations, base_name)
            if not name:
                result.unnamed.append(desc.digest)
                continue
            plain = Descriptor(desc.media_type, desc.digest, desc.size)
            result.images.append(await self._images.put(Image(name, plain)))
        return result

    async def _store_tree(self, archive: Archive, desc: Descriptor, depth: int) -> None:
        """Store ``desc`` and everything it references, children first, so the parent's
        garbage-collection labels never point at missing content."""
        if depth > MAX_DEPTH:
            raise errors.InvalidArgument("archive indexes nest too deeply")
        path = _blob_path(desc.digest)
        labels: dict[str, str] = {}
        if mediatypes.is_index(desc.media_type) or mediatypes.is_manifest(desc.media_type):
            body = archive.read_json(path)
            counts: dict[str, int] = {}
            for kind, child in _children(body, desc.media_type):
                if not archive.has(_blob_path(child.digest)):
                    if mediatypes.is_nondistributable(child.media_type):
                        continue  # foreign layers are fetched from elsewhere, if ever
                    raise errors.InvalidArgument(
                        f"archive is missing blob {child.digest} ({child.media_type})")
                await self._store_tree(archive, child, depth + 1)
                labels[_gc_label(kind, counts.get(kind, 0))] = child.digest
                counts[kind] = counts.get(kind, 0) + 1
        elif not archive.has(path):
            raise errors.InvalidArgument(f"archive is missing blob {desc.digest}")
        await self._content.write(f"import-{desc.digest}", archive.chunks(path),
                                  expected=desc.digest, total=archive.size(path), labels=labels)

    # -- docker save ------------------------------------------------------------

    async def _import_docker(self, archive: Archive) -> ImportResult:
        manifest = archive.read_json("manifest.json")
        if not isinstance(manifest, list):
            raise errors.InvalidArgument("manifest.json: expected a list")
        result = ImportResult()
        for entry in manifest:
            if not isinstance(entry, dict) or not isinstance(entry.get("Config"), str):
                raise errors.InvalidArgument("manifest.json: entry without Config")
            root = await self._store_docker_image(archive, entry)
            tags = entry.get("RepoTags") or []
            if not tags:
                result.unnamed.append(root.digest)
            for tag in tags:
                name = str(reference.normalize(str(tag)))
                result.images.append(await self._images.put(Image(name, root)))
        return result

    async def _store_docker_image(self, archive: Archive, entry: dict[str, Any]) -> Descriptor:
        labels: dict[str, str] = {}
        layers = []
        for i, path in enumerate(entry.get("Layers") or []):
            head = archive.open(path).read(4)
            kind = (mediatypes.DOCKER_LAYER_GZIP if head.startswith(GZIP_MAGIC)
                    else mediatypes.DOCKER_LAYER_ZSTD if head.startswith(ZSTD_MAGIC)
                    else mediatypes.DOCKER_LAYER)
            digest = await self._content.write(f"import-{secrets.token_hex(8)}",
                                               archive.chunks(path), total=archive.size(path))
            layers.append({"mediaType": kind, "size": archive.size(path), "digest": digest})
            labels[_gc_label("layer", i)] = digest
        config = entry["Config"]
        config_digest = await self._content.write(
            f"import-{secrets.token_hex(8)}", archive.chunks(config), total=archive.size(config))
        labels[_gc_label("config", 0)] = config_digest
        body = json.dumps({
            "schemaVersion": 2,
            "mediaType": mediatypes.DOCKER_MANIFEST,
            "config": {"mediaType": mediatypes.DOCKER_CONFIG, "size": archive.size(config),
                       "digest": config_digest},
            "layers": layers,
        }, separators=(",", ":")).encode()
        digest = await self._content.write(f"import-{secrets.token_hex(8)}", body,
                                           total=len(body), labels=labels)
        return Descriptor(mediatypes.DOCKER_MANIFEST, digest, len(body))


def _descriptor(obj: Any) -> Descriptor:
    if not isinstance(obj, dict) or not isinstance(obj.get("digest"), str):
        raise errors.InvalidArgument(f"invalid descriptor in archive: {str(obj)[:200]}")
    _blob_path(obj["digest"])
    return Descriptor.from_json(obj)


def _children(body: Any, media_type: str) -> list[tuple[str, Descriptor]]:
    if not isinstance(body, dict):
        raise errors.InvalidArgument(f"{media_type}: expected a JSON object")
    if mediatypes.is_index(media_type):
        return [("manifest", _descriptor(m)) for m in body.get("manifests") or []]
    children = [("config", _descriptor(body.get("config")))]
    children += [("layer", _descriptor(layer)) for layer in body.get("layers") or []]
    return children


def _gc_label(kind: str, i: int) -> str:
    # The names containerd's garbage collector follows from a parent blob to its children.
    if kind == "config":
        return "containerd.io/gc.ref.content.config"
    return f"containerd.io/gc.ref.content.{'m' if kind == 'manifest' else 'l'}.{i}"


def _oci_name(annotations: dict[str, str], base_name: str) -> str:
    full = annotations.get(mediatypes.ANNOTATION_IMAGE_NAME, "")
    if full:
        return full
    ref_name = annotations.get(mediatypes.ANNOTATION_REF_NAME, "")
    if not ref_name:
        return str(reference.normalize(base_name)) if base_name else ""
    if "/" in ref_name or ":" in ref_name or "@" in ref_name:
        return str(reference.normalize(ref_name))
    if base_name:
        return str(reference.normalize(f"{base_name}:{ref_name}"))
    return ""
