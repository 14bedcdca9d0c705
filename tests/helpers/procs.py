"""Finding processes from /proc, for tests' leak checks and cleanup."""
from __future__ import annotations

from pathlib import Path


def shim_pids(address: str, container_id: str | None = None) -> list[int]:
    """PIDs of shims (ours or containerd's) serving the daemon at ``address`` (and
    ``container_id``, if given): their command line names it. The shim's name may be
    the third word, after ``python -IS``."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if container_id is not None and container_id.encode() not in argv:
            continue
        if b"-address" in argv and address.encode() in argv and any(
                b"containerd-shim" in a for a in argv[:3]):
            pids.append(int(proc.name))
    return pids
