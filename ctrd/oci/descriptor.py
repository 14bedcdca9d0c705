"""OCI content descriptors and platforms: one record each for daemon, client and tests.

A descriptor names a blob (media type, digest, size) as manifests, indexes and the
API pass it around; ``urls`` and ``platform`` only appear in manifest and index
entries. Only protobuf message modules are imported, never grpc, so the image
writer and the client can use these records as freely as the daemon.
"""
from __future__ import annotations

import platform as host_platform
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ctrd.api.containerd.types import descriptor_pb2, platform_pb2
from ctrd.errors import InvalidArgument
from ctrd.oci import digest as digests

# uname -m -> (GOARCH, variant), as images name architectures.
_HOST_ARCHES = {
    "x86_64": ("amd64", ""), "amd64": ("amd64", ""),
    "aarch64": ("arm64", "v8"), "arm64": ("arm64", "v8"),
    "armv7l": ("arm", "v7"), "armv6l": ("arm", "v6"),
    "i686": ("386", ""), "i386": ("386", ""),
    "ppc64le": ("ppc64le", ""), "s390x": ("s390x", ""), "riscv64": ("riscv64", ""),
}


@dataclass(frozen=True)
class Platform:
    os: str
    architecture: str
    variant: str = ""
    os_version: str = ""
    os_features: tuple[str, ...] = ()

    @classmethod
    def host(cls) -> Platform:
        machine = host_platform.machine().lower()
        arch, variant = _HOST_ARCHES.get(machine, (machine, ""))
        return cls("linux", arch, variant)

    @classmethod
    def parse(cls, text: str) -> Platform:
        """The literal ``os/arch[/variant]`` form, nothing normalized."""
        parts = text.split("/")
        if len(parts) not in (2, 3) or not all(parts):
            raise InvalidArgument(f"invalid platform {text!r}: want os/arch[/variant]")
        return cls(*parts)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Platform:
        return cls(os=data.get("os", ""), architecture=data.get("architecture", ""),
                   variant=data.get("variant", ""), os_version=data.get("os.version", ""),
                   os_features=tuple(data.get("os.features") or ()))

    def to_json(self) -> dict[str, Any]:
        # Key order is part of the bytes, hence of the digests, of generated blobs.
        out: dict[str, Any] = {"architecture": self.architecture, "os": self.os}
        if self.os_version:
            out["os.version"] = self.os_version
        if self.os_features:
            out["os.features"] = list(self.os_features)
        if self.variant:
            out["variant"] = self.variant
        return out

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

    @classmethod
    def from_pb(cls, pb: descriptor_pb2.Descriptor) -> Descriptor:
        return cls(media_type=pb.media_type, digest=pb.digest, size=pb.size,
                   annotations=dict(pb.annotations))

    def to_pb(self) -> descriptor_pb2.Descriptor:
        return descriptor_pb2.Descriptor(media_type=self.media_type, digest=self.digest,
                                         size=self.size, annotations=dict(self.annotations))
