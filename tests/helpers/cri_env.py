"""A ctrd serving CRI for integration tests: its own bridge network, netns, CNI cache
and images, and cleanup that leaves nothing behind even when a test broke the daemon."""
from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from ctrd.api.k8s.cri.runtime.v1 import api_pb2 as pb
from ctrd.api.k8s.cri.runtime.v1 import api_pb2_grpc as rpc
from ctrd.oci import busybox, writer

from .containerd_ref import remove_namespace_dirs
from .ctrd_proc import CtrdProcess, new_base
from .procs import shim_pids
from .registry import Registry, start_registry
from .runtime_env import delete_runc_under

PAUSE = "ctrd.test/pause:1"
BUSYBOX = "ctrd.test/busybox:1"


@dataclass
class CRI:
    daemon: CtrdProcess
    runtime: rpc.RuntimeServiceStub
    images: rpc.ImageServiceStub
    subnet_prefix: str
    base: Path
    registry: Registry | None

    def pod_config(self, name: str, **kw) -> pb.PodSandboxConfig:
        kw.setdefault("hostname", name)
        return pb.PodSandboxConfig(
            metadata=pb.PodSandboxMetadata(name=name, uid=secrets.token_hex(8),
                                           namespace="default"),
            log_directory=str(self.base / "logs" / name), **kw)

    def run_pod(self, name: str, **kw) -> tuple[str, pb.PodSandboxConfig]:
        config = self.pod_config(name, **kw)
        Path(config.log_directory).mkdir(parents=True, exist_ok=True)
        resp = self.runtime.RunPodSandbox(pb.RunPodSandboxRequest(config=config), timeout=60)
        return resp.pod_sandbox_id, config

    def container(self, pod: str, pod_config: pb.PodSandboxConfig, name: str,
                  *command: str, **kw) -> str:
        kw.setdefault("log_path", f"{name}.log")
        config = pb.ContainerConfig(metadata=pb.ContainerMetadata(name=name),
                                    image=pb.ImageSpec(image=BUSYBOX), command=list(command),
                                    **kw)
        resp = self.runtime.CreateContainer(pb.CreateContainerRequest(
            pod_sandbox_id=pod, config=config, sandbox_config=pod_config), timeout=60)
        return resp.container_id

    def status(self, container: str) -> pb.ContainerStatus:
        return self.runtime.ContainerStatus(
            pb.ContainerStatusRequest(container_id=container), timeout=10).status

    def wait_exited(self, container: str, timeout: float = 15) -> pb.ContainerStatus:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status = self.status(container)
            if status.state == pb.CONTAINER_EXITED:
                return status
            time.sleep(0.05)
        raise AssertionError(f"container {container} did not exit: {status}")


def _cni_conf(folder: Path, bridge: str, subnet: str, ipam_dir: Path) -> None:
    folder.mkdir(parents=True)
    (folder / "10-ctrd-test.conflist").write_text(json.dumps({
        "cniVersion": "1.0.0", "name": "ctrd-cri-test",
        "plugins": [{"type": "bridge", "bridge": bridge, "isGateway": True, "ipMasq": False,
                     "ipam": {"type": "host-local", "ranges": [[{"subnet": subnet}]],
                              "dataDir": str(ipam_dir)}}],
    }))


def _import(daemon: CtrdProcess, folder: Path) -> None:
    archive = folder / "images.tar"
    pause = busybox.busybox_image(config=writer.ImageConfig(cmd=["sleep", "1000000"]))
    writer.write_oci_archive(archive, {PAUSE: pause, BUSYBOX: busybox.busybox_image()})
    daemon.ctr("images", "import", str(archive), namespace="k8s.io")


@contextlib.contextmanager
def cri_daemon() -> Iterator[CRI]:
    """A ctrd with CRI on a bridge network of its own, the test images imported, and a
    registry with basic auth (kube/pods) when the host has one; all removed after."""
    base = new_base("ctrd-cri-")
    bridge = f"ctrdcri{secrets.token_hex(3)}"
    third = int.from_bytes(os.urandom(1), "big") % 200 + 20
    _cni_conf(base / "net.d", bridge, f"10.253.{third}.0/24", base / "ipam")
    (base / "netns").mkdir()
    registry = None
    if shutil.which("docker-registry") and shutil.which("skopeo"):
        registry = start_registry(base / "registry", users={"kube": "pods"})
    plain_http = f'"{registry.host}"' if registry else ""
    config = f"""
[plugins."io.containerd.transfer.v1.local"]
plain_http = [{plain_http}]
[plugins."io.containerd.grpc.v1.cri"]
sandbox_image = "{PAUSE}"
netns_dir = "{base / 'netns'}"
# Root here lacks CAP_SYS_RESOURCE: the pause process's -998 is refused without it.
restrict_oom_score_adj = true
[plugins."io.containerd.grpc.v1.cri".cni]
conf_dir = "{base / 'net.d'}"
cache_dir = "{base / 'cni-cache'}"
"""
    daemon = CtrdProcess(base, config_text=config)
    channel = None
    try:
        daemon.start()
        _import(daemon, base)
        channel = grpc.insecure_channel(f"unix://{daemon.address}")
        yield CRI(daemon, rpc.RuntimeServiceStub(channel), rpc.ImageServiceStub(channel),
                  f"10.253.{third}.", base, registry)
    finally:
        if channel is not None:
            channel.close()
        if registry is not None:
            registry.stop()
        _teardown(daemon, base, bridge)


def _teardown(daemon: CtrdProcess, base: Path, bridge: str) -> None:
    # Pods left by a failed test: their tasks, netns and veths go with the daemon's help.
    if daemon.proc is not None and daemon.proc.poll() is None:
        try:
            with grpc.insecure_channel(f"unix://{daemon.address}") as channel:
                stub = rpc.RuntimeServiceStub(channel)
                for pod in stub.ListPodSandbox(pb.ListPodSandboxRequest(), timeout=10).items:
                    stub.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=pod.id),
                                        timeout=60)
                    stub.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=pod.id),
                                          timeout=60)
        except grpc.RpcError:
            pass
    daemon.stop()
    # Whatever the daemon lost track of (a test that broke its state) goes by force.
    for pid in shim_pids(daemon.address):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    delete_runc_under(base, "k8s.io")
    subprocess.run(["ip", "link", "del", bridge], capture_output=True, check=False)
    mounts = [line.split()[1] for line in Path("/proc/mounts").read_text().splitlines()]
    for target in sorted((m for m in mounts if m.startswith(str(base))), reverse=True):
        subprocess.run(["umount", "-l", target], check=False)
    shutil.rmtree(base, ignore_errors=True)
    remove_namespace_dirs(["k8s.io"])


def code_of(call, *args, **kw) -> grpc.StatusCode:
    """The status code ``call`` fails with (pytest fails the test if it succeeds)."""
    with pytest.raises(grpc.RpcError) as info:
        call(*args, **kw)
    return info.value.code()
