"""Records shared by several service areas: descriptors, mounts, platforms."""
from __future__ import annotations

from dataclasses import dataclass

from google.protobuf import timestamp_pb2

from ctrd.api.containerd.types import mount_pb2
# One OCI descriptor and platform record for daemon and client alike.
from ctrd.oci.descriptor import Descriptor, Platform

__all__ = ["Descriptor", "Mount", "Platform", "nanos"]


def nanos(ts: timestamp_pb2.Timestamp) -> int:
    """Nanoseconds since the epoch; 0 for an unset timestamp."""
    return ts.ToNanoseconds()


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
