"""Importing an image archive (OCI layout tar or ``docker save`` tar) from a byte stream.

As containerd's archive importer does, every regular file of the tar is written to the
content store as it streams by (files under ``blobs/<alg>/<hex>`` are verified against
the digest their path names); then the archive's root is found: ``index.json`` of an
OCI layout, or an index built from docker's ``manifest.json`` (one manifest per entry,
named by its RepoTags). The tree under the root is then checked and labelled for the
garbage collector, unpacked if asked, and only then are image records written. All of
it happens under a temporary lease, so a failure at any point leaves nothing behind
once the lease is gone; image records, the only names, come last.
"""
from __future__ import annotations

import asyncio
import gzip
import json
import posixpath
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import structlog

from ctrd import reference
from ctrd.errors import (
    AlreadyExists,
    CtrdError,
    DataLoss,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
)
from ctrd.oci import digest as digests
from ctrd.oci import mediatypes

from ..diff.walking import UNCOMPRESSED_LABEL
from ..metadata.images import Descriptor as ImageTarget
from ..metadata.images import Image
from ctrd.oci.descriptor import Descriptor, Platform
from ..remotes.platforms import Matcher
from . import jsonblob
from .progress import Tracker
from .pull import GC_REF_CONTENT, Stores, store_image
from .tarstream import REGULAR, SYMLINK, TarReader
from .unpacking import UnpackTarget, config_platform, snapshotter_for, unpack_layers

log = structlog.get_logger()

# index.json, manifest.json, manifests and configs are small; bigger ones are hostile.
JSON_LIMIT = 20 << 20
MAX_DEPTH = 8
WRITE_CHUNK = 1 << 20
REF_TYPE_NAME = "io.containerd.import.ref-source"
GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


@dataclass(frozen=True)
class ImageReference:
    """How imported images are named (containerd's transfer ImageReference)."""

    name: str
    is_prefix: bool = False
    allow_overwrite: bool = False
    add_digest: bool = False
    skip_named_digest: bool = False


@dataclass
class ImportOptions:
    image_name: str = ""  # a name for the archive's root index
    references: list[ImageReference] = field(default_factory=list)
    labels: dict[str, str] = field(default_factory=dict)
    platforms: Matcher = field(default_factory=lambda: Matcher(()))
    manifest_limit: int = 0
    unpack: list[UnpackTarget] = field(default_factory=list)
    force_compress: bool = False


@dataclass(frozen=True)
class _Blob:
    digest: str
    size: int


def _digest_of_path(path: str) -> str:
    """``blobs/<alg>/<hex>`` -> ``<alg>:<hex>`` when it is a valid digest, else ""."""
    parts = path.split("/")
    if len(parts) != 3 or parts[0] != "blobs":
        return ""
    candidate = f"{parts[1]}:{parts[2]}"
    return candidate if digests.is_valid(candidate) else ""


def _dumps(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


def oci_ref_name(name: str) -> str:
    """The tag or digest of ``name`` alone (what OCI puts in ref.name), as containerd does."""
    slash = name.find("/")
    rest = name[slash + 1:] if slash >= 0 else ""
    for i, char in enumerate(rest):
        if char in ":@":
            obj = rest[i:]
            return obj[1:] if obj.startswith(":") else obj
    return "" if slash >= 0 else name


def _prefix_translate(prefix: str, check_prefix: bool, ref: str) -> str:
    # containerd's refTranslator: a tag alone gets the prefix; a full reference is kept
    # (when checking, only if it lies under the prefix).
    if any(c in ref for c in "/:@"):
        if check_prefix and not (ref.startswith(prefix) and (
                len(ref) == len(prefix) or ref[len(prefix)] in "/:@")):
            return ""
        return ref
    return f"{prefix}:{ref}"


def _annotation_name(annotations: dict[str, str], prefix: ImageReference | None) -> str:
    full = annotations.get(mediatypes.ANNOTATION_IMAGE_NAME, "")
    ref_name = annotations.get(mediatypes.ANNOTATION_REF_NAME, "")
    if prefix is None:
        # No prefix asked for: use the archive's own names; a bare tag names nothing.
        if full:
            return full
        if ref_name and any(c in ref_name for c in "/:@"):
            try:
                return str(reference.normalize(ref_name))
            except InvalidArgument:
                return ""
        return ""
    if full:
        kept = _prefix_translate(prefix.name, not prefix.allow_overwrite, full)
        return full if kept == full else ""
    if ref_name:
        return _prefix_translate(prefix.name, not prefix.allow_overwrite, ref_name)
    return ""


class ArchiveImporter:
    """One import into ``namespace`` from ``chunks`` (the archive's bytes)."""

    def __init__(self, stores: Stores, namespace: str, options: ImportOptions,
                 tracker: Tracker, lease: str) -> None:
        self.stores = stores
        self.namespace = namespace
        self.options = options
        self.tracker = tracker
        self.lease = lease
        self._id = secrets.token_hex(6)
        self._count = 0
        self._manifests: list[tuple[Descriptor, Platform | None]] = []

    async def run(self, chunks: AsyncIterator[bytes]) -> list[Image]:
        root = await self._read_archive(chunks)
        children = await self._walk(root, depth=0)
        await self._unpack()
        return await self._store_images(root, children)

    # ---- reading the tar

    async def _read_archive(self, chunks: AsyncIterator[bytes]) -> Descriptor:
        blobs: dict[str, _Blob] = {}
        symlinks: dict[str, str] = {}
        layout: Any = None
        docker_manifest: Any = None
        reader = TarReader(chunks)
        async for member in reader:
            if member.type == SYMLINK:
                symlinks[member.name] = posixpath.normpath(
                    posixpath.join(posixpath.dirname(member.name), member.linkname))
                continue
            if member.type != REGULAR:
                continue
            if member.name == "oci-layout":
                layout = jsonblob.parse(await reader.read_all(JSON_LIMIT), "oci-layout")
            elif member.name == "manifest.json":
                docker_manifest = jsonblob.parse(await reader.read_all(JSON_LIMIT),
                                               "manifest.json")
            elif member.name == "index.json":
                data = await reader.read_all(JSON_LIMIT)
                blobs[member.name] = await self._ingest_bytes(data)
            else:
                blobs[member.name] = await self._ingest(member.name, member.size,
                                                        reader.data())
        if isinstance(layout, dict) and layout.get("imageLayoutVersion"):
            version = layout["imageLayoutVersion"]
            if version != mediatypes.OCI_LAYOUT_VERSION:
                raise InvalidArgument(f"unsupported OCI layout version {version!r}")
            index = blobs.get("index.json")
            if index is None:
                raise InvalidArgument("OCI layout without index.json")
            return Descriptor(mediatypes.OCI_INDEX, index.digest, index.size)
        if docker_manifest is None:
            raise InvalidArgument("unrecognized image format: neither an OCI archive "
                                  "(oci-layout, index.json) nor a docker archive (manifest.json)")
        for name, target in symlinks.items():
            if target not in blobs:
                raise InvalidArgument(f"no target for symlink layer {name!r} -> {target!r}")
            blobs[name] = blobs[target]
        return await self._docker_index(docker_manifest, blobs)

    def _ref(self) -> str:
        self._count += 1
        return f"import-{self._id}-{self._count}"

    async def _ingest_bytes(self, data: bytes) -> _Blob:
        dgst = str(digests.of_bytes(data))

        async def once() -> AsyncIterator[bytes]:
            yield data

        return await self._ingest("index.json", len(data), once(), dgst)

    async def _ingest(self, name: str, size: int, data: AsyncIterator[bytes],
                      expected: str | None = None) -> _Blob:
        """Write one member to the content store; verify it if its path names a digest."""
        if expected is None:
            expected = _digest_of_path(name)
        cs = self.stores.content
        ref = self._ref()
        try:
            writer = await cs.writer(self.namespace, ref, total=size, expected=expected,
                                     lease=self.lease)
        except AlreadyExists:
            async for _ in data:
                pass
            return _Blob(expected, size)
        committed = False
        try:
            if writer.shared_size is not None:
                # The blob is on disk already (another namespace): it is verified content;
                # the archive's copy is not needed.
                async for _ in data:
                    pass
            else:
                await writer.truncate()
                pending: list[bytes] = []
                pending_size = 0
                async for chunk in data:
                    pending.append(chunk)
                    pending_size += len(chunk)
                    if pending_size >= WRITE_CHUNK:
                        await writer.write(b"".join(pending))
                        pending, pending_size = [], 0
                if pending:
                    await writer.write(b"".join(pending))
            actual = expected or await writer.digest()
            try:
                await writer.commit(size, expected)
            except AlreadyExists:
                pass
            except (FailedPrecondition, DataLoss) as exc:
                raise InvalidArgument(f"archive file {name!r} does not match its digest "
                                      f"{expected}: {exc}") from None
            committed = True
        finally:
            await writer.close()
            if not committed:
                await self._abort(ref)
        return _Blob(actual, size)

    async def _abort(self, ref: str) -> None:
        # Cleanup after a failure: the failure itself is what the caller must see.
        try:
            await self.stores.content.abort(self.namespace, ref)
        except CtrdError as exc:
            if not isinstance(exc, NotFound):
                log.warning("import ingest not aborted", ref=ref, error=str(exc))

    # ---- docker save archives

    async def _docker_index(self, entries: Any, blobs: dict[str, _Blob]) -> Descriptor:
        if not isinstance(entries, list):
            raise InvalidArgument("manifest.json: expected a list of images")
        manifests: list[dict[str, Any]] = []
        for entry in entries:
            if not isinstance(entry, dict) or not isinstance(entry.get("Config"), str):
                raise InvalidArgument("manifest.json: an entry has no Config")
            config = blobs.get(posixpath.normpath(entry["Config"]))
            if config is None:
                raise InvalidArgument(f"image config {entry['Config']!r} not found in archive")
            layer_paths = entry.get("Layers") or []
            if not isinstance(layer_paths, list) or \
                    not all(isinstance(p, str) for p in layer_paths):
                raise InvalidArgument("manifest.json: Layers must be a list of paths")
            layers = [await self._docker_layer(p, blobs) for p in layer_paths]
            body = _dumps({
                "schemaVersion": 2,
                "mediaType": mediatypes.DOCKER_MANIFEST,
                "config": {"mediaType": mediatypes.DOCKER_CONFIG, "digest": config.digest,
                           "size": config.size},
                "layers": layers,
            })
            desc = await self._write_json(body, mediatypes.DOCKER_MANIFEST)
            entry_json: dict[str, Any] = desc
            platform = await self._config_platform(config.digest)
            if platform:
                entry_json = {**desc, "platform": platform}
            tags = entry.get("RepoTags") or []
            if not isinstance(tags, list):
                raise InvalidArgument("manifest.json: RepoTags must be a list")
            if not tags:
                manifests.append(entry_json)
            for tag in tags:
                name = str(reference.normalize(str(tag)))
                manifests.append({**entry_json, "annotations": {
                    mediatypes.ANNOTATION_IMAGE_NAME: name,
                    mediatypes.ANNOTATION_REF_NAME: oci_ref_name(name)}})
        body = _dumps({"schemaVersion": 2, "mediaType": mediatypes.OCI_INDEX,
                       "manifests": manifests})
        index = await self._write_json(body, mediatypes.OCI_INDEX)
        return Descriptor(index["mediaType"], index["digest"], index["size"])

    async def _docker_layer(self, path: str, blobs: dict[str, _Blob]) -> dict[str, Any]:
        blob = blobs.get(posixpath.normpath(path))
        if blob is None:
            raise InvalidArgument(f"layer {path!r} not found in archive")
        head = await self._head(blob.digest)
        if head.startswith(GZIP_MAGIC):
            kind = mediatypes.DOCKER_LAYER_GZIP
        elif head.startswith(ZSTD_MAGIC):
            kind = mediatypes.DOCKER_LAYER_ZSTD
        elif self.options.force_compress:
            return await self._compress(blob)
        else:
            kind = mediatypes.DOCKER_LAYER
        return {"mediaType": kind, "digest": blob.digest, "size": blob.size}

    async def _head(self, dgst: str) -> bytes:
        async for chunk in await self.stores.content.read(self.namespace, dgst, 0, 4):
            return chunk[:4]
        return b""

    async def _compress(self, blob: _Blob) -> dict[str, Any]:
        """gzip an uncompressed layer (the import's force_compress option)."""
        source = await self.stores.content.path(self.namespace, blob.digest)

        def compress() -> bytes:
            # mtime=0 keeps the result (and so its digest) the same on every import.
            return gzip.compress(source.read_bytes(), compresslevel=6, mtime=0)

        data = await asyncio.to_thread(compress)
        dgst = str(digests.of_bytes(data))
        await self.stores.content.write_blob(self.namespace, data, dgst,
                                             labels={UNCOMPRESSED_LABEL: blob.digest},
                                             lease=self.lease, ref=self._ref())
        return {"mediaType": mediatypes.DOCKER_LAYER_GZIP, "digest": dgst, "size": len(data)}

    async def _config_platform(self, dgst: str) -> dict[str, str]:
        config = await self._read_json(dgst, "image config")
        platform = {"architecture": config.get("architecture", ""), "os": config.get("os", "")}
        if config.get("variant"):
            platform["variant"] = config["variant"]
        return platform if platform["os"] else {}

    async def _write_json(self, body: bytes, media_type: str) -> dict[str, Any]:
        dgst = str(digests.of_bytes(body))
        await self.stores.content.write_blob(self.namespace, body, dgst, lease=self.lease,
                                             ref=self._ref())
        return {"mediaType": media_type, "digest": dgst, "size": len(body)}

    # ---- checking and labelling the tree

    async def _read_json(self, dgst: str, what: str) -> dict[str, Any]:
        info = await self._info(dgst, what)
        if info.size > JSON_LIMIT:
            raise InvalidArgument(f"{what} {dgst} is too large ({info.size} bytes)")
        return await jsonblob.read_json(self.stores.content, self.namespace, dgst,
                                        f"{what} {dgst}")

    async def _info(self, dgst: str, what: str) -> Any:
        try:
            return await self.stores.content.info(self.namespace, dgst)
        except NotFound:
            raise InvalidArgument(f"{what} {dgst} is missing from the archive") from None

    async def _has(self, dgst: str) -> bool:
        try:
            await self.stores.content.info(self.namespace, dgst)
            return True
        except NotFound:
            return False

    async def _walk(self, desc: Descriptor, depth: int,
                    platform: Platform | None = None) -> list[Descriptor]:
        """Check ``desc``'s subtree is complete and label it; returns its present children."""
        if depth > MAX_DEPTH:
            raise InvalidArgument("archive indexes nest too deeply")
        self.tracker.add(desc)
        if mediatypes.is_index(desc.media_type):
            children = await self._walk_index(desc, depth)
        elif mediatypes.is_manifest(desc.media_type):
            children = await self._walk_manifest(desc, platform)
        else:
            raise InvalidArgument(f"{desc.digest}: unsupported media type {desc.media_type!r} "
                                  f"in an index")
        self.tracker.done(desc)
        return children

    async def _walk_index(self, desc: Descriptor, depth: int) -> list[Descriptor]:
        body = await self._read_json(desc.digest, "index")
        raw = body.get("manifests") or []
        if not isinstance(raw, list):
            raise InvalidArgument(f"index {desc.digest}: manifests is not a list")
        entries = [Descriptor.from_json(m) if isinstance(m, dict) else
                   Descriptor.from_json({}) for m in raw]
        matcher = self.options.platforms
        ranked = [(matcher.rank(e.platform) if e.platform is not None else 0, i, e)
                  for i, e in enumerate(entries)]
        chosen = sorted((r for r in ranked if r[0] is not None), key=lambda r: (r[0], r[1]))
        if self.options.manifest_limit:
            chosen = chosen[:self.options.manifest_limit]
        present: list[Descriptor] = []
        for _, _, entry in sorted(chosen, key=lambda r: r[1]):
            if not (mediatypes.is_index(entry.media_type)
                    or mediatypes.is_manifest(entry.media_type)):
                continue
            if not await self._has(entry.digest):
                if not matcher.matches_all:
                    raise InvalidArgument(f"manifest {entry.digest} ({entry.platform}) named by "
                                          f"index {desc.digest} is missing from the archive")
                # Exports of one platform keep the whole index: skip what was left out.
                log.info("manifest not in archive; skipped", digest=entry.digest)
                continue
            present.append(entry)
        if entries and not present:
            raise InvalidArgument(f"none of the manifests of index {desc.digest} "
                                  f"is in the archive")
        labels = {f"{GC_REF_CONTENT}.m.{i}": c.digest for i, c in enumerate(present)}
        await self._label(desc.digest, labels)
        for child in present:
            await self._walk(child, depth + 1, child.platform)
        return present

    async def _walk_manifest(self, desc: Descriptor, platform: Platform | None
                             ) -> list[Descriptor]:
        body = await self._read_json(desc.digest, "manifest")
        try:
            config = Descriptor.from_json(body["config"])
            layers = [Descriptor.from_json(layer) for layer in body.get("layers") or []]
        except (KeyError, TypeError, AttributeError) as exc:
            raise InvalidArgument(f"manifest {desc.digest} without {exc}") from None
        await self._info(config.digest, f"config of manifest {desc.digest}")
        labels = {f"{GC_REF_CONTENT}.config": config.digest}
        for i, layer in enumerate(layers):
            if not await self._has(layer.digest):
                if mediatypes.is_nondistributable(layer.media_type):
                    continue  # foreign layers are not shipped in archives
                raise InvalidArgument(f"layer {layer.digest} of manifest {desc.digest} "
                                      f"is missing from the archive")
            labels[f"{GC_REF_CONTENT}.l.{i}"] = layer.digest
        await self._label(desc.digest, labels)
        self._manifests.append((desc, platform))
        return [config, *layers]

    async def _label(self, dgst: str, labels: dict[str, str]) -> None:
        if labels:
            await self.stores.content.update(self.namespace, dgst, labels,
                                             [f"labels.{k}" for k in labels])

    # ---- unpacking

    async def _unpack(self) -> None:
        if not self.options.unpack or self.stores.unpack is None:
            return
        done: set[tuple[str, str]] = set()
        for manifest, platform in self._manifests:
            body = await self._read_json(manifest.digest, "manifest")
            config = Descriptor.from_json(body["config"])
            # Only layer media types have a diff ID in the config's rootfs.
            layers = [layer for layer in map(Descriptor.from_json, body.get("layers") or [])
                      if mediatypes.is_layer(layer.media_type)]
            cfg = await self._read_json(config.digest, "image config")
            snapshotter = snapshotter_for(
                self.options.unpack, config_platform(cfg) if platform is None else platform,
                self.stores.default_snapshotter)
            if snapshotter is None or (manifest.digest, snapshotter) in done:
                continue
            done.add((manifest.digest, snapshotter))
            await unpack_layers(self.stores.unpack, self.namespace, self.lease, self.tracker,
                                manifest, config, cfg, layers, snapshotter)

    # ---- image records

    def _names(self, desc: Descriptor, from_annotations: bool) -> list[str]:
        """containerd's ImageStore naming: the root by the store's names, the entries
        of the root index by their annotations, filtered through prefix references."""
        names: list[str] = []
        if not from_annotations:
            if self.options.image_name:
                names.append(self.options.image_name)
            for ref in self.options.references:
                if not ref.is_prefix:
                    names.append(f"{ref.name}@{desc.digest}" if ref.add_digest else ref.name)
            return names
        prefixes = [r for r in self.options.references if r.is_prefix]
        if not prefixes:
            name = _annotation_name(dict(desc.annotations), None)
            return [name] if name else []
        for ref in prefixes:
            name = _annotation_name(dict(desc.annotations), ref)
            if not name:
                if ref.add_digest:
                    names.append(f"{ref.name}@{desc.digest}")
                continue
            names.append(name)
            if ref.add_digest and not ref.skip_named_digest:
                names.append(f"{ref.name}@{desc.digest}")
        return names

    async def _store_images(self, root: Descriptor, children: list[Descriptor]) -> list[Image]:
        wanted: list[tuple[str, Descriptor]] = [(n, root) for n in self._names(root, False)]
        for child in children:
            wanted += [(n, child) for n in self._names(child, True)]
        if not wanted:
            log.info("import named no images", namespace=self.namespace, root=root.digest)
        stored: list[Image] = []
        seen: set[str] = set()
        for name, desc in wanted:
            if name in seen:
                continue
            seen.add(name)
            annotations = {k: v for k, v in desc.annotations.items() if k != REF_TYPE_NAME}
            target = ImageTarget(desc.media_type, desc.digest, desc.size, annotations)
            image = await store_image(self.stores, self.namespace, name, target,
                                      dict(self.options.labels))
            self.tracker.emit("saved", image.name)
            stored.append(image)
        return stored
