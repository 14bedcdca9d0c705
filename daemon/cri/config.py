"""Settings of the CRI plugin, read from its ``[plugins."io.containerd.grpc.v1.cri"]`` table.

Key names follow containerd 1.6's CRI configuration where it has one, so that a
containerd config's CRI section mostly carries over.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# kubelet talks to the "k8s.io" containerd namespace; so do crictl and ctr -n k8s.io.
NAMESPACE = "k8s.io"
DEFAULT_SANDBOX_IMAGE = "registry.k8s.io/pause:3.6"


@dataclass(frozen=True)
class CRIConfig:
    root: Path  # sandbox files (hosts, resolv.conf, shm) live under it
    state: Path  # FIFOs of containers and execs
    sandbox_image: str = DEFAULT_SANDBOX_IMAGE
    snapshotter: str = "overlayfs"
    runtime: str = "io.containerd.runc.v2"
    netns_dir: Path = Path("/var/run/netns")
    cni_bin_dirs: tuple[str, ...] = ("/opt/cni/bin", "/usr/lib/cni")
    cni_conf_dir: Path = Path("/etc/cni/net.d")
    cni_cache_dir: Path = Path("/var/lib/cni")
    max_log_line: int = 16 * 1024
    # Where Exec and PortForward URLs point; port 0 takes any free one, as containerd.
    stream_address: str = "127.0.0.1"
    stream_port: int = 0
    # Never give a process a lower oom_score_adj than the daemon's own (containerd's
    # option, for hosts where lowering it is not allowed).
    restrict_oom_score_adj: bool = False

    def oom_floor(self) -> int | None:
        if not self.restrict_oom_score_adj:
            return None
        with open("/proc/self/oom_score_adj") as f:
            return int(f.read())

    @classmethod
    def from_options(cls, options: Mapping[str, Any], root: Path, state: Path) -> CRIConfig:
        cni = options.get("cni", {}) or {}
        runtime = options.get("containerd", {}) or {}
        bin_dir = cni.get("bin_dir")
        return cls(
            root=root, state=state,
            sandbox_image=str(options.get("sandbox_image", DEFAULT_SANDBOX_IMAGE)),
            snapshotter=str(runtime.get("snapshotter", "overlayfs")),
            runtime=str(runtime.get("default_runtime_name", "io.containerd.runc.v2")),
            netns_dir=Path(options.get("netns_dir", "/var/run/netns")),
            cni_bin_dirs=tuple(bin_dir.split(":")) if bin_dir else cls.cni_bin_dirs,
            cni_conf_dir=Path(cni.get("conf_dir", "/etc/cni/net.d")),
            cni_cache_dir=Path(cni.get("cache_dir", "/var/lib/cni")),
            max_log_line=int(options.get("max_container_log_line_size", 16 * 1024)),
            stream_address=str(options.get("stream_server_address", "127.0.0.1")),
            stream_port=int(options.get("stream_server_port", 0)),
            restrict_oom_score_adj=bool(options.get("restrict_oom_score_adj", False)),
        )
