"""What the CRI workload needs besides the daemons: a pod network per daemon, and a client.

Each daemon gets a CNI bridge network of its own (its bridge, its private /24, its
IPAM folder), set up by Debian's CNI plugins from /usr/lib/cni; the bench never
reads or writes /etc/cni or /opt/cni. The client is a plain gRPC stub of CRI v1 on
the daemon's main socket, as kubelet's, and is the same for both daemons.
"""
from __future__ import annotations

import json
import secrets
import subprocess
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import grpc
import structlog

from ctrd.api.k8s.cri.runtime.v1 import api_pb2 as pb
from ctrd.api.k8s.cri.runtime.v1 import api_pb2_grpc as rpc

# The namespace both daemons keep CRI's containers and images in.
CRI_NAMESPACE = "k8s.io"
PAUSE_IMAGE = "bench.local/pause:latest"
CNI_BIN_DIR = Path("/usr/lib/cni")
# containerd 1.6 gives no setting for libcni's cache: it always writes there.
LIBCNI_CACHE = Path("/var/lib/cni")

log = structlog.get_logger()


@dataclass(frozen=True)
class PodNetwork:
    """A daemon's CNI network: a bridge of its own on a private /24, files under ``folder``."""

    name: str  # the CNI network's name, which also prefixes libcni's cache files
    bridge: str
    subnet: str
    folder: Path

    @classmethod
    def for_daemon(cls, folder: Path, even: bool) -> PodNetwork:
        # Random, so that two bench runs at once do not meet; one daemon of a run
        # takes even /24s and the other odd ones, so they never share one.
        third = secrets.randbelow(128) * 2 + (0 if even else 1)
        tag = secrets.token_hex(3)
        return cls(f"ctrd-bench-{tag}", f"cbench{tag}", f"10.252.{third}.0/24", folder)

    @property
    def conf_dir(self) -> Path:
        return self.folder / "net.d"

    @property
    def netns_dir(self) -> Path:
        return self.folder / "netns"

    @property
    def cache_dir(self) -> Path:
        return self.folder / "cni-cache"

    def write(self) -> None:
        """The conflist the daemon loads at start: bridge + host-local, nothing else.

        No gateway address and no masquerading: the pods need no way out, and the
        bridge plugin then changes no host sysctl and adds no iptables rule.
        """
        self.conf_dir.mkdir(parents=True, exist_ok=True)
        self.netns_dir.mkdir(parents=True, exist_ok=True)
        (self.conf_dir / "10-bench.conflist").write_text(json.dumps({
            "cniVersion": "1.0.0", "name": self.name,
            "plugins": [{"type": "bridge", "bridge": self.bridge, "isGateway": False,
                         "ipMasq": False,
                         "ipam": {"type": "host-local", "ranges": [[{"subnet": self.subnet}]],
                                  "dataDir": str(self.folder / "ipam")}}],
        }, indent=2))

    def remove(self, pods: Iterable[str] = ()) -> None:
        """Delete the bridge, and what libcni cached outside ``folder`` for this network
        and for the loopback of ``pods`` (a pod's DEL removes both; an interrupted run
        may not have got that far)."""
        subprocess.run(["ip", "link", "del", self.bridge], capture_output=True, check=False)
        results = LIBCNI_CACHE / "results"
        leftovers = [*results.glob(f"{self.name}-*"),
                     *(results / f"cni-loopback-{pod}-lo" for pod in pods)]
        for leftover in leftovers:
            leftover.unlink(missing_ok=True)
        # Only empty folders go, so another user's cache stays.
        for folder in (results, LIBCNI_CACHE):
            try:
                folder.rmdir()
            except OSError:
                pass


@dataclass(frozen=True)
class Pod:
    id: str
    container: str


class CriClient:
    """CRI v1 calls the workload makes, on one daemon's socket."""

    def __init__(self, address: str) -> None:
        self.channel = grpc.insecure_channel(f"unix://{address}")
        self.runtime = rpc.RuntimeServiceStub(self.channel)
        self.images = rpc.ImageServiceStub(self.channel)

    def close(self) -> None:
        self.channel.close()

    def wait_ready(self, images: list[str], timeout: float = 30.0) -> None:
        """Until the runtime and its network are ready and the images are known to CRI.

        Importing with `ctr` tells containerd's CRI of the images through events, a
        moment later; the network config is loaded at start, or soon after.
        """
        self.runtime.Version(pb.VersionRequest(version="v1"), timeout=10)
        deadline = time.monotonic() + timeout
        while True:
            conditions = {c.type: c.status for c in self.runtime.Status(
                pb.StatusRequest(), timeout=10).status.conditions}
            missing = [image for image in images if not self.images.ImageStatus(
                pb.ImageStatusRequest(image=pb.ImageSpec(image=image)),
                timeout=10).HasField("image")]
            ready = conditions.get("RuntimeReady") and conditions.get("NetworkReady")
            if ready and not missing:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"CRI not ready: conditions {conditions}, "
                                   f"images missing {missing}")
            time.sleep(0.1)

    @staticmethod
    def pod_config(name: str, log_directory: Path, cgroup_parent: str) -> pb.PodSandboxConfig:
        # kubelet always names a cgroup parent; one under the bench's own cgroup keeps
        # the pods apart from other users of the k8s.io namespace on this machine.
        return pb.PodSandboxConfig(
            metadata=pb.PodSandboxMetadata(name=name, uid=secrets.token_hex(16),
                                           namespace="ctrd-bench"),
            hostname=name, log_directory=str(log_directory),
            linux=pb.LinuxPodSandboxConfig(cgroup_parent=cgroup_parent))

    def run_pod(self, config: pb.PodSandboxConfig) -> str:
        return self.runtime.RunPodSandbox(pb.RunPodSandboxRequest(config=config),
                                          timeout=120).pod_sandbox_id

    def start_container(self, pod: str, config: pb.PodSandboxConfig, image: str,
                        command: list[str]) -> str:
        container = pb.ContainerConfig(metadata=pb.ContainerMetadata(name="main"),
                                       image=pb.ImageSpec(image=image), command=command,
                                       log_path="main.log")
        container_id = self.runtime.CreateContainer(pb.CreateContainerRequest(
            pod_sandbox_id=pod, config=container, sandbox_config=config),
            timeout=120).container_id
        self.runtime.StartContainer(pb.StartContainerRequest(container_id=container_id),
                                    timeout=120)
        return container_id

    def is_running(self, container: str) -> bool:
        return self.runtime.ContainerStatus(pb.ContainerStatusRequest(
            container_id=container), timeout=10).status.state == pb.CONTAINER_RUNNING

    def remove_pod(self, pod: str) -> None:
        self.runtime.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=pod), timeout=120)
        self.runtime.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=pod),
                                      timeout=120)

    def remove_all(self) -> int:
        """Stop and remove every pod (with its containers); returns how many there were."""
        pods = self.runtime.ListPodSandbox(pb.ListPodSandboxRequest(), timeout=30).items
        for pod in pods:
            self.remove_pod(pod.id)
        return len(pods)


def netns_mounts(under: Path) -> list[str]:
    """Network namespaces still mounted below ``under`` (a pod whose netns was kept)."""
    found = []
    for line in Path("/proc/mounts").read_text().splitlines():
        fields = line.split()
        if fields[2] == "nsfs" and fields[1].startswith(str(under) + "/"):
            found.append(fields[1])
    return found
