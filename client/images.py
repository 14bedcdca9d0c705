"""containerd.services.images.v1 plus reading an image's manifests from content."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from google.protobuf import field_mask_pb2

from ctrd import errors
from ctrd.api.containerd.services.images.v1 import images_pb2 as pb
from ctrd.api.containerd.services.images.v1 import images_pb2_grpc as pb_grpc
from ctrd.oci import mediatypes

from .connection import Connection
from .content import Content
from .types import Descriptor, Platform, nanos


@dataclass(frozen=True)
class Image:
    name: str
    target: Descriptor
    labels: dict[str, str] = field(default_factory=dict)
    created_at: int = 0
    updated_at: int = 0

    @classmethod
    def from_pb(cls, msg: pb.Image) -> Image:
        return cls(msg.name, Descriptor.from_pb(msg.target), dict(msg.labels),
                   nanos(msg.created_at), nanos(msg.updated_at))

    def to_pb(self) -> pb.Image:
        return pb.Image(name=self.name, target=self.target.to_pb(), labels=self.labels)


@dataclass(frozen=True)
class ResolvedImage:
    """One platform's manifest of an image, with its parsed config."""

    image: Image
    manifest: Descriptor
    config_descriptor: Descriptor
    config: dict[str, Any]
    layers: tuple[Descriptor, ...]

    @property
    def diff_ids(self) -> list[str]:
        return list(self.config.get("rootfs", {}).get("diff_ids", []))

    @property
    def size(self) -> int:
        return self.manifest.size + self.config_descriptor.size + sum(d.size for d in self.layers)


class Images:
    def __init__(self, conn: Connection) -> None:
        self._conn = conn
        self._stub = pb_grpc.ImagesStub(conn.channel)
        self._content = Content(conn)

    async def get(self, name: str) -> Image:
        resp = await self._conn.unary(self._stub.Get, pb.GetImageRequest(name=name))
        return Image.from_pb(resp.image)

    async def list(self, filters: list[str] | None = None) -> list[Image]:
        resp = await self._conn.unary(self._stub.List, pb.ListImagesRequest(filters=filters or []))
        return [Image.from_pb(i) for i in resp.images]

    async def create(self, image: Image) -> Image:
        resp = await self._conn.unary(self._stub.Create, pb.CreateImageRequest(image=image.to_pb()))
        return Image.from_pb(resp.image)

    async def update(self, image: Image, fields: list[str] | None = None) -> Image:
        mask = field_mask_pb2.FieldMask(paths=fields) if fields else None
        resp = await self._conn.unary(
            self._stub.Update, pb.UpdateImageRequest(image=image.to_pb(), update_mask=mask))
        return Image.from_pb(resp.image)

    async def put(self, image: Image) -> Image:
        """Create the image, or point an existing one of that name at the new target."""
        try:
            return await self.create(image)
        except errors.AlreadyExists:
            return await self.update(image, ["target"] if not image.labels else None)

    async def delete(self, name: str, *, sync: bool = False) -> None:
        await self._conn.unary(self._stub.Delete, pb.DeleteImageRequest(name=name, sync=sync))

    async def resolve(self, image: Image, platform: Platform | None = None) -> ResolvedImage:
        """Walk from the image's target to the manifest for ``platform`` (the host's
        by default) and read its config."""
        want = platform or Platform.host()
        desc = image.target
        for _ in range(8):  # indexes may nest; a cycle must not spin forever
            if mediatypes.is_index(desc.media_type):
                index = json.loads(await self._content.read(desc.digest))
                desc = _pick(index.get("manifests") or [], want, image.name)
                continue
            if not mediatypes.is_manifest(desc.media_type):
                raise errors.FailedPrecondition(
                    f"image {image.name}: unsupported media type {desc.media_type!r}")
            manifest = json.loads(await self._content.read(desc.digest))
            config_desc = Descriptor.from_json(manifest.get("config") or {})
            config = json.loads(await self._content.read(config_desc.digest))
            layers = tuple(Descriptor.from_json(d) for d in manifest.get("layers") or [])
            return ResolvedImage(image, desc, config_desc, config, layers)
        raise errors.FailedPrecondition(f"image {image.name}: indexes nested too deeply")


def _pick(manifests: list[dict[str, Any]], want: Platform, name: str) -> Descriptor:
    for entry in manifests:
        plat = entry.get("platform")
        if plat is None or want.matches(Platform.from_json(plat)):
            return Descriptor.from_json(entry)
    raise errors.NotFound(f"image {name}: no manifest for platform {want}")
