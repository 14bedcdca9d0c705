"""Snapshot mounts as the task API carries them."""
from __future__ import annotations

from collections.abc import Sequence

from ctrd.api.containerd.types import mount_pb2

from ..snapshots.mounts import Mount


def to_proto(mounts: Sequence[Mount]) -> list[mount_pb2.Mount]:
    return [mount_pb2.Mount(type=m.type, source=m.source, options=list(m.options))
            for m in mounts]
