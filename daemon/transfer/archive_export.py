"""Exporting images as an OCI archive (with docker's manifest.json), as containerd does.

The archive holds ``oci-layout``, an ``index.json`` naming each exported image (its
target descriptor with ``io.containerd.image.name`` and the OCI ``ref.name``
annotations added), every blob under ``blobs/<alg>/<hex>`` and, unless skipped, a
docker ``manifest.json`` so that ``docker load`` reads it too. Members are sorted by
name and blobs are checked against their digests while they are sent. Everything is
resolved before the first byte goes out, so an unknown image or a missing blob fails
the export without a partial archive.
"""
from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from ctrd import reference
from ctrd.errors import DataLoss, FailedPrecondition, InvalidArgument, NotFound
from ctrd.oci import digest as digests
from ctrd.oci import mediatypes

from ..metadata.images import Image
from ctrd.oci.descriptor import Descriptor
from ..remotes.platforms import Matcher
from .archive_import import JSON_LIMIT, oci_ref_name
from .jsonblob import read_json
from .progress import Tracker
from .pull import Stores
from .tarstream import END, header, padding


@dataclass
class ExportOptions:
    names: list[str]
    platforms: Matcher  # the host's platform when the request names none
    all_platforms: bool = False
    skip_docker_manifest: bool = False
    skip_non_distributable: bool = False


@dataclass
class _Record:
    name: str
    size: int = 0
    data: bytes | None = None  # small generated files
    digest: str = ""  # blobs, read from the content store
    directory: bool = False
    mode: int = 0o444
    media_type: str = ""


@dataclass
class _DockerEntry:
    manifest: Descriptor
    names: list[str] = field(default_factory=list)


def _blob_path(dgst: str) -> str:
    parsed = digests.Digest.parse(dgst)
    return f"blobs/{parsed.algorithm}/{parsed.hex}"


def _go_json(value: Any) -> bytes:
    # Go's encoding/json: compact, map keys sorted, and <, >, & escaped.
    text = json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026").encode()


def _descriptor_json(desc: Descriptor) -> dict[str, Any]:
    """Field order of the OCI Go types, which containerd's index.json follows."""
    out: dict[str, Any] = {"mediaType": desc.media_type, "digest": desc.digest,
                           "size": desc.size}
    if desc.urls:
        out["urls"] = list(desc.urls)
    if desc.annotations:
        out["annotations"] = dict(sorted(desc.annotations.items()))
    if desc.platform is not None:
        out["platform"] = desc.platform.to_json()
    return out


def _familiar(name: str) -> str:
    return reference.normalize(name).familiar()


class ArchiveExporter:
    def __init__(self, stores: Stores, namespace: str, options: ExportOptions,
                 tracker: Tracker) -> None:
        self.stores = stores
        self.namespace = namespace
        self.options = options
        self.tracker = tracker
        self._records: dict[str, _Record] = {}
        self._algorithms: set[str] = set()

    async def prepare(self, images: list[Image]) -> Callable[[], AsyncIterator[bytes]]:
        """Resolve everything to send; returns a generator of the archive's bytes."""
        targets = []
        for image in images:
            t = image.target
            annotations = {**t.annotations, mediatypes.ANNOTATION_IMAGE_NAME: image.name,
                           mediatypes.ANNOTATION_REF_NAME: oci_ref_name(image.name)}
            targets.append(Descriptor(t.media_type, t.digest, t.size, annotations))
        docker: dict[str, _DockerEntry] = {}
        resolved_index: dict[str, str] = {}
        for desc in targets:
            name = desc.annotations[mediatypes.ANNOTATION_IMAGE_NAME]
            if mediatypes.is_manifest(desc.media_type):
                if desc.digest not in docker:
                    await self._add_tree(desc)
                    docker[desc.digest] = _DockerEntry(desc)
                if not self.options.skip_docker_manifest:
                    docker[desc.digest].names.append(name)
            elif mediatypes.is_index(desc.media_type):
                if desc.digest not in resolved_index:
                    resolved_index[desc.digest] = await self._add_index(desc, docker)
                chosen = resolved_index[desc.digest]
                if chosen:
                    docker[chosen].names.append(name)
            else:
                raise InvalidArgument(f"image {name}: only manifests and indexes may be "
                                      f"exported, not {desc.media_type!r}")
        self._add_file("oci-layout", _go_json(
            {"imageLayoutVersion": mediatypes.OCI_LAYOUT_VERSION}), 0o444)
        self._add_file("index.json", _go_json(
            {"schemaVersion": 2, "manifests": [_descriptor_json(d) for d in targets]}), 0o644)
        if docker and not self.options.skip_docker_manifest:
            self._add_file("manifest.json", await self._docker_manifest(docker), 0o644)
        if self._algorithms:
            self._records["blobs/"] = _Record("blobs/", directory=True, mode=0o755)
            for algorithm in self._algorithms:
                path = f"blobs/{algorithm}/"
                self._records[path] = _Record(path, directory=True, mode=0o755)
        return self._generate

    def _add_file(self, name: str, data: bytes, mode: int) -> None:
        self._records[name] = _Record(name, len(data), data=data, mode=mode)

    def _add_blob(self, desc: Descriptor) -> None:
        if self.options.skip_non_distributable and \
                mediatypes.is_nondistributable(desc.media_type):
            return
        path = _blob_path(desc.digest)
        self._algorithms.add(path.split("/")[1])
        self._records.setdefault(path, _Record(path, desc.size, digest=desc.digest,
                                                      media_type=desc.media_type))

    async def _read_json(self, desc: Descriptor) -> dict[str, Any]:
        if desc.size > JSON_LIMIT:
            raise InvalidArgument(f"{desc.digest} is too large to be a manifest")
        try:
            return await read_json(self.stores.content, self.namespace, desc.digest, desc.digest)
        except NotFound:
            raise NotFound(f"content {desc.digest} ({desc.media_type}) needed for the "
                           f"export is not in the content store") from None

    async def _check(self, desc: Descriptor) -> None:
        try:
            info = await self.stores.content.info(self.namespace, desc.digest)
        except NotFound:
            raise NotFound(f"content {desc.digest} ({desc.media_type}) needed for the "
                           f"export is not in the content store") from None
        if info.size != desc.size:
            raise FailedPrecondition(f"content {desc.digest} has {info.size} bytes, "
                                     f"its descriptor says {desc.size}")

    async def _add_tree(self, desc: Descriptor, depth: int = 0) -> None:
        """``desc`` and everything under it (containerd's exporter walks all children)."""
        if depth > 8:
            raise InvalidArgument("indexes nest too deeply")
        skipped = self.options.skip_non_distributable and \
            mediatypes.is_nondistributable(desc.media_type)
        if not skipped:
            await self._check(desc)
        self._add_blob(desc)
        self.tracker.add(desc)
        children: list[Descriptor] = []
        if mediatypes.is_manifest(desc.media_type):
            body = await self._read_json(desc)
            children = [Descriptor.from_json(body.get("config") or {})]
            children += [Descriptor.from_json(d) for d in body.get("layers") or []]
        elif mediatypes.is_index(desc.media_type):
            body = await self._read_json(desc)
            children = [Descriptor.from_json(d) for d in body.get("manifests") or []]
        for child in children:
            await self._add_tree(child, depth + 1)

    async def _add_index(self, desc: Descriptor, docker: dict[str, _DockerEntry]) -> str:
        """Add an index and its chosen manifests; the digest docker's manifest.json uses."""
        await self._check(desc)
        self._add_blob(desc)
        body = await self._read_json(desc)
        entries = [Descriptor.from_json(d) for d in body.get("manifests") or []]
        matcher = self.options.platforms
        matched: list[tuple[int, int, Descriptor]] = []
        for i, entry in enumerate(entries):
            rank = matcher.rank(entry.platform) if entry.platform is not None else 0
            if rank is not None:
                matched.append((rank, i, entry))
            elif not self.options.all_platforms:
                continue
            await self._add_tree(entry)
        if self.options.skip_docker_manifest:
            return ""
        if not matched:
            raise NotFound(f"index {desc.digest}: no manifest found for platform "
                           f"{', '.join(str(p) for p in matcher.wanted) or 'any'}")
        # Entries without a platform sort last, as in containerd.
        matched.sort(key=lambda r: (r[2].platform is None, r[0], r[1]))
        best = matched[0][2]
        docker.setdefault(best.digest, _DockerEntry(best))
        return best.digest

    async def _docker_manifest(self, entries: dict[str, _DockerEntry]) -> bytes:
        out = []
        for entry in entries.values():
            body = await self._read_json(entry.manifest)
            config = body.get("config") or {}
            layers = body.get("layers") or []
            out.append({
                "Config": _blob_path(str(config.get("digest", ""))),
                "RepoTags": [_familiar(n) for n in entry.names] or None,
                "Layers": [_blob_path(str(layer.get("digest", ""))) for layer in layers] or None,
            })
        return _go_json(out)

    async def _generate(self) -> AsyncIterator[bytes]:
        self.tracker.emit("Exporting")
        for name in sorted(self._records):
            record = self._records[name]
            yield header(record.name, record.size, directory=record.directory, mode=record.mode)
            if record.directory:
                continue
            if record.data is not None:
                yield record.data
            else:
                async for chunk in self._blob(record):
                    yield chunk
            yield padding(record.size)
        yield END

    async def _blob(self, record: _Record) -> AsyncIterator[bytes]:
        hasher = digests.Digest.parse(record.digest).hasher()
        sent = 0
        async for chunk in await self.stores.content.read(self.namespace, record.digest):
            hasher.update(chunk)
            sent += len(chunk)
            if sent > record.size:
                break
            yield chunk
        actual = f"{hasher.name}:{hasher.hexdigest()}"
        if sent != record.size or actual != record.digest:
            raise DataLoss(f"content {record.digest} changed or is corrupt: read {sent} bytes "
                           f"hashing to {actual}")
        self.tracker.done(Descriptor(record.media_type, record.digest, record.size))
