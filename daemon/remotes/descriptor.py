"""OCI content descriptors as the registry code passes them around."""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ctrd.api.containerd.types import descriptor_pb2
from ctrd.errors import InvalidArgument
from ctrd.oci import digest as digests


@dataclass(frozen=True)
class Platform:
    os: str
    architecture: str
    variant: str = ""
    os_version: str = ""
    os_features: tuple[str, ...] = ()

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Platform:
        return cls(os=data.get("os", ""), architecture=data.get("architecture", ""),
                   variant=data.get("variant", ""), os_version=data.get("os.version", ""),
                   os_features=tuple(data.get("os.features") or ()))

    def __str__(self) -> str:
        text = f"{self.os}/{self.architecture}"
        return f"{text}/{self.variant}" if self.variant else text


@dataclass(frozen=True)
class Descriptor:
    media_type: str
    digest: str
    size: int
    annotations: Mapping[str, str] = field(default_factory=dict)
    urls: tuple[str, ...] = ()
    platform: Platform | None = None

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Descriptor:
        """A descriptor from a manifest or index entry; digest and size are checked."""
        try:
            dgst = data["digest"]
            size = data["size"]
        except (KeyError, TypeError) as exc:
            raise InvalidArgument(f"invalid descriptor {data!r}: missing {exc}") from None
        digests.validate(dgst)
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise InvalidArgument(f"invalid descriptor size {size!r} for {dgst}")
        platform = data.get("platform")
        return cls(media_type=data.get("mediaType", ""), digest=dgst, size=size,
                   annotations=dict(data.get("annotations") or {}),
                   urls=tuple(data.get("urls") or ()),
                   platform=Platform.from_json(platform) if isinstance(platform, dict) else None)

    def to_pb(self) -> descriptor_pb2.Descriptor:
        return descriptor_pb2.Descriptor(media_type=self.media_type, digest=self.digest,
                                         size=self.size, annotations=dict(self.annotations))

    @classmethod
    def from_pb(cls, pb: descriptor_pb2.Descriptor) -> Descriptor:
        return cls(media_type=pb.media_type, digest=pb.digest, size=pb.size,
                   annotations=dict(pb.annotations))
