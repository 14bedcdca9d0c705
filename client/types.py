"""Records shared by several service areas: descriptors, mounts, platforms."""
from __future__ import annotations

import platform as host
from dataclasses import dataclass, field
from typing import Any

from google.protobuf import timestamp_pb2

from ctrd.api.containerd.types import descriptor_pb2, mount_pb2, platform_pb2
from ctrd.errors import InvalidArgument


def nanos(ts: timestamp_pb2.Timestamp) -> int:
    """Nanoseconds since the epoch; 0 for an unset timestamp."""
    return ts.ToNanoseconds()


@dataclass(frozen=True)
class Descriptor:
    media_type: str
    digest: str
    size: int
    annotations: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_pb(cls, pb: descriptor_pb2.Descriptor) -> Descriptor:
        return cls(pb.media_type, pb.digest, pb.size, dict(pb.annotations))

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> Descriptor:
        return cls(obj.get("mediaType", ""), obj.get("digest", ""), int(obj.get("size", 0)),
                   dict(obj.get("annotations") or {}))

    def to_pb(self) -> descriptor_pb2.Descriptor:
        return descriptor_pb2.Descriptor(media_type=self.media_type, digest=self.digest,
                                         size=self.size, annotations=self.annotations)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"mediaType": self.media_type, "digest": self.digest,
                               "size": self.size}
        if self.annotations:
            out["annotations"] = dict(self.annotations)
        return out


@dataclass(frozen=True)
class Mount:
    type: str
    source: str
    target: str = ""
    options: tuple[str, ...] = ()

    @classmethod
    def from_pb(cls, pb: mount_pb2.Mount) -> Mount:
        return cls(pb.type, pb.source, pb.target, tuple(pb.options))

    def to_pb(self) -> mount_pb2.Mount:
        return mount_pb2.Mount(type=self.type, source=self.source, target=self.target,
                               options=list(self.options))


_ARCHES = {
    "x86_64": ("amd64", ""), "amd64": ("amd64", ""),
    "aarch64": ("arm64", ""), "arm64": ("arm64", ""),
    "armv7l": ("arm", "v7"), "armv6l": ("arm", "v6"),
    "i686": ("386", ""), "i386": ("386", ""),
}


@dataclass(frozen=True)
class Platform:
    os: str
    architecture: str
    variant: str = ""

    @classmethod
    def host(cls) -> Platform:
        arch, variant = _ARCHES.get(host.machine().lower(), (host.machine().lower(), ""))
        return cls("linux", arch, variant)

    @classmethod
    def parse(cls, text: str) -> Platform:
        parts = text.split("/")
        if len(parts) not in (2, 3) or not all(parts):
            raise InvalidArgument(f"invalid platform {text!r}: want os/arch[/variant]")
        return cls(*parts)

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> Platform:
        return cls(obj.get("os", ""), obj.get("architecture", ""), obj.get("variant", ""))

    def to_pb(self) -> platform_pb2.Platform:
        return platform_pb2.Platform(os=self.os, architecture=self.architecture,
                                     variant=self.variant)

    def matches(self, other: Platform) -> bool:
        """Whether an image built for ``other`` runs here; an empty variant matches any
        (arm64 images rarely name theirs)."""
        if (self.os, self.architecture) != (other.os, other.architecture):
            return False
        return not self.variant or not other.variant or self.variant == other.variant

    def __str__(self) -> str:
        return "/".join(p for p in (self.os, self.architecture, self.variant) if p)
