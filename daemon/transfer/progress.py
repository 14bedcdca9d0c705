"""Progress of a transfer, as containerd 1.7's transfer service reports it.

Events name a piece of content by its ref key (``layer-sha256:...``) with the keys of
its parents, so a client can draw a tree: ``waiting`` when a blob is queued,
``downloading``/``uploading`` with byte counts while it moves (throttled), ``complete``
or ``already exists`` at the end, ``unpacking``/``unpacked`` per layer; plus free-text
events ("Resolving from ...", "saved") for the transfer as a whole.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from ctrd.oci import mediatypes
from ctrd.oci.descriptor import Descriptor

# Byte-count events for one blob are sent at most this often.
INTERVAL = 0.25


@dataclass(frozen=True)
class Progress:
    event: str
    name: str = ""
    parents: tuple[str, ...] = ()
    progress: int = 0
    total: int = 0


ProgressFunc = Callable[[Progress], None]


def ref_key(desc: Descriptor) -> str:
    """containerd's name for a piece of content in ingests and progress: kind-digest."""
    media_type = mediatypes.base(desc.media_type)
    if mediatypes.is_manifest(media_type):
        kind = "manifest"
    elif mediatypes.is_index(media_type):
        kind = "index"
    elif mediatypes.is_layer(media_type):
        kind = "layer"
    elif mediatypes.is_config(media_type):
        kind = "config"
    else:
        kind = "unknown"
    return f"{kind}-{desc.digest}"


@dataclass
class Tracker:
    """Turns byte counts into throttled progress events for one transfer."""

    report: ProgressFunc | None
    root: str
    moving: str = "downloading"
    _parents: dict[str, tuple[str, ...]] = field(default_factory=dict)
    _last: dict[str, float] = field(default_factory=dict)

    def emit(self, event: str, name: str = "", *, parents: tuple[str, ...] = (),
             progress: int = 0, total: int = 0) -> None:
        if self.report is not None:
            self.report(Progress(event, name, parents, progress, total))

    def add(self, desc: Descriptor, parent: Descriptor | None = None) -> None:
        name = ref_key(desc)
        if name in self._parents:
            return
        self._parents[name] = (ref_key(parent),) if parent is not None else (self.root,)
        self.emit("waiting", name, parents=self._parents[name], total=desc.size)

    def parents(self, desc: Descriptor) -> tuple[str, ...]:
        return self._parents.get(ref_key(desc), (self.root,))

    def moved(self, desc: Descriptor, offset: int) -> None:
        name = ref_key(desc)
        now = time.monotonic()
        if now - self._last.get(name, 0.0) < INTERVAL and offset < desc.size:
            return
        self._last[name] = now
        self.emit(self.moving, name, parents=self.parents(desc), progress=offset, total=desc.size)

    def done(self, desc: Descriptor, existed: bool = False) -> None:
        self.emit("already exists" if existed else "complete", ref_key(desc),
                  parents=self.parents(desc), progress=desc.size, total=desc.size)
