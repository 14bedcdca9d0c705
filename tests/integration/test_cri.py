"""CRI v1 against a real ctrd: pods on a real CNI bridge network, real runc containers.

The client is a plain gRPC stub of runtime.v1, as kubelet's. Images come from the
host's busybox-static (no registry needed); the pod network is a bridge of this
test's own, on a private subnet, torn down with the module.
"""
from __future__ import annotations

import base64
import concurrent.futures
import os
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from helpers.cri_env import BUSYBOX, CRI, PAUSE, code_of, cri_daemon
from helpers.daemon_proc import CTR

from ctrd.api.k8s.cri.runtime.v1 import api_pb2 as pb
from ctrd.oci import busybox, writer

pytestmark = [pytest.mark.integration, pytest.mark.skipif(
    not Path("/usr/lib/cni/bridge").exists(), reason="needs containernetworking-plugins")]

@pytest.fixture(scope="module")
def cri() -> Iterator[CRI]:
    with cri_daemon() as env:
        yield env


# -- runtime status and images -------------------------------------------------------------


def test_version_and_status(cri: CRI) -> None:
    version = cri.runtime.Version(pb.VersionRequest(version="v1"), timeout=10)
    assert version.runtime_name == "ctrd" and version.runtime_api_version == "v1"
    conditions = {c.type: c.status for c in
                  cri.runtime.Status(pb.StatusRequest(), timeout=10).status.conditions}
    assert conditions == {"RuntimeReady": True, "NetworkReady": True}
    config = cri.runtime.RuntimeConfig(pb.RuntimeConfigRequest(), timeout=10)
    assert config.linux.cgroup_driver == pb.CGROUPFS
    # Calls ctrd does not serve check their ids first, as containerd's do.
    assert code_of(cri.runtime.Attach, pb.AttachRequest(container_id="x"), timeout=10) == \
        grpc.StatusCode.NOT_FOUND
    assert code_of(cri.runtime.CheckpointContainer, pb.CheckpointContainerRequest(
        container_id="x"), timeout=10) == grpc.StatusCode.UNIMPLEMENTED


def test_images_are_listed_by_id(cri: CRI) -> None:
    images = cri.images.ListImages(pb.ListImagesRequest(), timeout=10).images
    tags = {tag: image for image in images for tag in image.repo_tags}
    assert {PAUSE, BUSYBOX} <= set(tags)
    image = tags[BUSYBOX]
    assert image.id.startswith("sha256:") and image.size > 100_000
    # Imported by tag only: no digest name was recorded, so none is made up.
    assert list(image.repo_digests) == []
    status = cri.images.ImageStatus(pb.ImageStatusRequest(image=pb.ImageSpec(image=image.id)),
                                    timeout=10)
    assert status.image.repo_tags == image.repo_tags
    for short in (image.id.removeprefix("sha256:"), image.id[7:19], image.id[:19]):
        found = cri.images.ImageStatus(pb.ImageStatusRequest(image=pb.ImageSpec(image=short)),
                                       timeout=10)
        assert found.image.id == image.id, short
    missing = cri.images.ImageStatus(pb.ImageStatusRequest(
        image=pb.ImageSpec(image="ctrd.test/nothing:here")), timeout=10)
    assert not missing.HasField("image")
    fs = cri.images.ImageFsInfo(pb.ImageFsInfoRequest(), timeout=30).image_filesystems
    assert fs[0].used_bytes.value > 0 and fs[0].fs_id.mountpoint


def test_hostile_image_requests(cri: CRI) -> None:
    assert code_of(cri.images.ImageStatus, pb.ImageStatusRequest(image=pb.ImageSpec(image="")),
                 timeout=10) == grpc.StatusCode.INVALID_ARGUMENT
    # Not a reference nor an ID: no such image, an empty answer (as containerd's).
    assert not cri.images.ImageStatus(pb.ImageStatusRequest(
        image=pb.ImageSpec(image="UPPER/Case::bad")), timeout=10).HasField("image")
    assert code_of(cri.images.PullImage, pb.PullImageRequest(
        image=pb.ImageSpec(image="ctrd.test/x:1"), auth=pb.AuthConfig(auth="%%%")),
        timeout=10) == grpc.StatusCode.INVALID_ARGUMENT
    # Removing what is not there is fine, as CRI asks.
    cri.images.RemoveImage(pb.RemoveImageRequest(image=pb.ImageSpec(image="ctrd.test/no:pe")),
                           timeout=10)


def test_pull_with_credentials_run_and_remove(cri: CRI) -> None:
    if cri.registry is None:
        pytest.skip("needs docker-registry and skopeo")
    image = busybox.busybox_image(config=writer.ImageConfig(cmd=["sleep", "1000"]))
    cri.registry.push_image(image, "cri/busybox:v1", cri.base)
    ref = f"{cri.registry.host}/cri/busybox:v1"
    spec = pb.ImageSpec(image=ref)
    assert code_of(cri.images.PullImage, pb.PullImageRequest(image=spec), timeout=60) == \
        grpc.StatusCode.UNAUTHENTICATED
    assert code_of(cri.images.PullImage, pb.PullImageRequest(
        image=spec, auth=pb.AuthConfig(username="kube", password="wrong")), timeout=60) == \
        grpc.StatusCode.UNAUTHENTICATED
    pulled = cri.images.PullImage(pb.PullImageRequest(
        image=spec, auth=pb.AuthConfig(username="kube", password="pods")), timeout=120)
    status = cri.images.ImageStatus(pb.ImageStatusRequest(image=spec), timeout=10).image
    assert status.id == pulled.image_ref and status.repo_tags == [ref]
    assert f"{cri.registry.host}/cri/busybox@{image.digest}" in status.repo_digests
    # The same pull with the credentials as docker's base64 "auth" field.
    again = cri.images.PullImage(pb.PullImageRequest(image=spec, auth=pb.AuthConfig(
        auth=base64.b64encode(b"kube:pods").decode())), timeout=120)
    assert again.image_ref == pulled.image_ref
    pod, config = cri.run_pod("pulled")
    try:
        c = cri.runtime.CreateContainer(pb.CreateContainerRequest(
            pod_sandbox_id=pod, sandbox_config=config, config=pb.ContainerConfig(
                metadata=pb.ContainerMetadata(name="from-registry"), image=spec)),
            timeout=60).container_id
        cri.runtime.StartContainer(pb.StartContainerRequest(container_id=c), timeout=60)
        out = cri.runtime.ExecSync(pb.ExecSyncRequest(container_id=c, cmd=["echo", "up"]),
                                   timeout=30)
        assert out.stdout == b"up\n"
    finally:
        cri.runtime.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=pod), timeout=60)
        cri.runtime.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=pod), timeout=60)
    cri.images.RemoveImage(pb.RemoveImageRequest(image=pb.ImageSpec(image=pulled.image_ref)),
                           timeout=30)
    assert not cri.images.ImageStatus(pb.ImageStatusRequest(image=spec),
                                      timeout=10).HasField("image")
    names = cri.daemon.ctr("images", "ls", "-q", namespace="k8s.io").stdout
    assert "cri/busybox" not in names and pulled.image_ref not in names


# -- pods and containers -------------------------------------------------------------------


def test_pod_lifecycle_with_network(cri: CRI) -> None:
    pod, config = cri.run_pod("web")
    status = cri.runtime.PodSandboxStatus(pb.PodSandboxStatusRequest(pod_sandbox_id=pod),
                                          timeout=10).status
    assert status.state == pb.SANDBOX_READY
    assert status.network.ip.startswith(cri.subnet_prefix)
    assert status.metadata.name == "web"
    listed = cri.runtime.ListPodSandbox(pb.ListPodSandboxRequest(
        filter=pb.PodSandboxFilter(id=pod[:12])), timeout=10).items
    assert [p.id for p in listed] == [pod]
    # The pod's containers share its network namespace: they see its address.
    c = cri.container(pod, config, "app", "sleep", "1000")
    cri.runtime.StartContainer(pb.StartContainerRequest(container_id=c), timeout=60)
    out = cri.runtime.ExecSync(pb.ExecSyncRequest(container_id=c, cmd=["ip", "-4", "addr"],
                                                  timeout=10), timeout=30)
    assert out.exit_code == 0 and status.network.ip.encode() in out.stdout
    hostname = cri.runtime.ExecSync(pb.ExecSyncRequest(container_id=c, cmd=["hostname"]),
                                    timeout=30)
    assert hostname.stdout.strip() == b"web"
    # The pause process asks for -998, restricted to the daemon's own score here.
    own = int(Path(f"/proc/{cri.daemon.proc.pid}/oom_score_adj").read_text())
    assert int(Path(f"/proc/{_task_pid(cri, pod)}/oom_score_adj").read_text()) == max(-998, own)
    cri.runtime.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=pod), timeout=60)
    assert cri.status(c).state == pb.CONTAINER_EXITED
    stopped = cri.runtime.PodSandboxStatus(pb.PodSandboxStatusRequest(pod_sandbox_id=pod),
                                           timeout=10).status
    assert stopped.state == pb.SANDBOX_NOTREADY and stopped.network.ip == ""
    # Stop is idempotent; the netns is gone after it.
    cri.runtime.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=pod), timeout=60)
    assert not any((cri.base / "netns").iterdir())
    cri.runtime.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=pod), timeout=60)
    cri.runtime.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=pod), timeout=60)
    assert code_of(cri.runtime.ContainerStatus, pb.ContainerStatusRequest(container_id=c),
                 timeout=10) == grpc.StatusCode.NOT_FOUND
    assert not cri.runtime.ListPodSandbox(pb.ListPodSandboxRequest(), timeout=10).items
    # Nothing of the pod is left: no record in containerd's view, no snapshot.
    assert cri.daemon.ctr("containers", "ls", "-q", namespace="k8s.io").stdout.strip() == ""
    snapshots = cri.daemon.ctr("snapshots", "ls", namespace="k8s.io").stdout
    assert pod not in snapshots and c not in snapshots


def test_container_exit_code_and_logs(cri: CRI) -> None:
    pod, config = cri.run_pod("logs")
    try:
        c = cri.container(pod, config, "say", "sh", "-c",
                          "echo out-line; echo err-line >&2; printf partial; exit 3",
                          envs=[pb.KeyValue(key="GREETING", value="hi")])
        assert cri.status(c).state == pb.CONTAINER_CREATED
        cri.runtime.StartContainer(pb.StartContainerRequest(container_id=c), timeout=60)
        status = cri.wait_exited(c)
        assert status.exit_code == 3 and status.reason == "Error"
        assert status.finished_at >= status.started_at > 0
        log_path = Path(config.log_directory) / "say.log"
        assert status.log_path == str(log_path)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and "partial" not in log_path.read_text():
            time.sleep(0.05)
        lines = log_path.read_text().splitlines()
        parsed = [line.split(" ", 3)[1:] for line in lines]
        assert ["stdout", "F", "out-line"] in parsed
        assert ["stderr", "F", "err-line"] in parsed
        # containerd tags a last line without its newline P (partial), and so does ctrd.
        assert ["stdout", "P", "partial"] in parsed
        # A started container cannot be started again.
        assert code_of(cri.runtime.StartContainer, pb.StartContainerRequest(container_id=c),
                     timeout=30) == grpc.StatusCode.FAILED_PRECONDITION
        listed = cri.runtime.ListContainers(pb.ListContainersRequest(filter=pb.ContainerFilter(
            pod_sandbox_id=pod, state=pb.ContainerStateValue(state=pb.CONTAINER_EXITED))),
            timeout=10).containers
        assert [x.id for x in listed] == [c]
    finally:
        cri.runtime.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=pod), timeout=60)
        cri.runtime.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=pod), timeout=60)


def test_stop_container_escalates_to_kill(cri: CRI) -> None:
    pod, config = cri.run_pod("stopper")
    try:
        # The shell ignores SIGTERM: StopContainer must fall back to SIGKILL after 1 s.
        c = cri.container(pod, config, "stubborn", "sh", "-c",
                          "trap '' TERM; while :; do sleep 1; done")
        cri.runtime.StartContainer(pb.StartContainerRequest(container_id=c), timeout=60)
        started = time.monotonic()
        cri.runtime.StopContainer(pb.StopContainerRequest(container_id=c, timeout=1),
                                  timeout=60)
        assert time.monotonic() - started >= 1
        status = cri.status(c)
        assert status.state == pb.CONTAINER_EXITED and status.exit_code == 137
        # Stopping a stopped container is fine; removing twice too.
        cri.runtime.StopContainer(pb.StopContainerRequest(container_id=c, timeout=1),
                                  timeout=60)
        cri.runtime.RemoveContainer(pb.RemoveContainerRequest(container_id=c), timeout=60)
        cri.runtime.RemoveContainer(pb.RemoveContainerRequest(container_id=c), timeout=60)
    finally:
        cri.runtime.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=pod), timeout=60)
        cri.runtime.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=pod), timeout=60)


def test_exec_sync_timeout_and_exitcode_of(cri: CRI) -> None:
    pod, config = cri.run_pod("execs")
    try:
        c = cri.container(pod, config, "idle", "sleep", "1000")
        cri.runtime.StartContainer(pb.StartContainerRequest(container_id=c), timeout=60)
        out = cri.runtime.ExecSync(pb.ExecSyncRequest(
            container_id=c, cmd=["sh", "-c", "echo o; echo e >&2; exit 7"]), timeout=30)
        assert (out.stdout, out.stderr, out.exit_code) == (b"o\n", b"e\n", 7)
        # No seccomp was asked for: none, as kubelet's default means under containerd.
        assert _seccomp_mode(cri, c) == b"0"
        confined = cri.container(pod, config, "confined", "sleep", "1000",
                                 linux=pb.LinuxContainerConfig(
                                     security_context=pb.LinuxContainerSecurityContext(
                                         seccomp=pb.SecurityProfile(
                                             profile_type=pb.SecurityProfile.RuntimeDefault))))
        cri.runtime.StartContainer(pb.StartContainerRequest(container_id=confined), timeout=60)
        assert _seccomp_mode(cri, confined) == b"2"
        started = time.monotonic()
        assert code_of(cri.runtime.ExecSync, pb.ExecSyncRequest(
            container_id=c, cmd=["sleep", "30"], timeout=1), timeout=30) == \
            grpc.StatusCode.DEADLINE_EXCEEDED
        assert time.monotonic() - started < 15
        assert code_of(cri.runtime.ExecSync, pb.ExecSyncRequest(container_id=c, cmd=[]),
                     timeout=30) == grpc.StatusCode.INVALID_ARGUMENT
        # A negative timeout is none, as containerd takes it.
        assert cri.runtime.ExecSync(pb.ExecSyncRequest(container_id=c, cmd=["true"],
                                                       timeout=-1), timeout=30).exit_code == 0
        # Streaming exec hands back a URL (test_cri_streaming.py goes there).
        assert cri.runtime.Exec(pb.ExecRequest(container_id=c, cmd=["sh"], stdout=True),
                                timeout=10).url.startswith("http://127.0.0.1:")
        assert code_of(cri.runtime.ExecSync, pb.ExecSyncRequest(
            container_id="f" * 64, cmd=["true"]), timeout=30) == grpc.StatusCode.NOT_FOUND
    finally:
        cri.runtime.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=pod), timeout=60)
        cri.runtime.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=pod), timeout=60)


def test_hostile_pod_and_container_requests(cri: CRI) -> None:
    bad = cri.pod_config("")
    assert code_of(cri.runtime.RunPodSandbox, pb.RunPodSandboxRequest(config=bad),
                 timeout=30) == grpc.StatusCode.INVALID_ARGUMENT
    assert code_of(cri.runtime.RunPodSandbox, pb.RunPodSandboxRequest(
        config=cri.pod_config("x"), runtime_handler="nope"), timeout=30) == \
        grpc.StatusCode.INVALID_ARGUMENT
    assert code_of(cri.runtime.RunPodSandbox, pb.RunPodSandboxRequest(
        config=cri.pod_config("x", hostname="bad host/name")), timeout=30) == \
        grpc.StatusCode.INVALID_ARGUMENT
    assert code_of(cri.runtime.PodSandboxStatus, pb.PodSandboxStatusRequest(
        pod_sandbox_id="nope"), timeout=10) == grpc.StatusCode.NOT_FOUND
    assert code_of(cri.runtime.CreateContainer, pb.CreateContainerRequest(
        pod_sandbox_id="nope", config=pb.ContainerConfig(
            metadata=pb.ContainerMetadata(name="a"), image=pb.ImageSpec(image=BUSYBOX))),
        timeout=10) == grpc.StatusCode.NOT_FOUND
    pod, config = cri.run_pod("hostile")
    try:
        # The same pod name and attempt twice is refused while the first exists.
        assert code_of(cri.runtime.RunPodSandbox, pb.RunPodSandboxRequest(config=config),
                     timeout=30) == grpc.StatusCode.ALREADY_EXISTS
        c = cri.container(pod, config, "one", "sleep", "1")
        assert code_of(cri.container, pod, config, "one", "sleep", "1") == \
            grpc.StatusCode.ALREADY_EXISTS
        assert code_of(cri.container, pod, config, "up", "true", log_path="../../escape.log") \
            == grpc.StatusCode.INVALID_ARGUMENT
        assert code_of(cri.runtime.CreateContainer, pb.CreateContainerRequest(
            pod_sandbox_id=pod, config=pb.ContainerConfig(
                metadata=pb.ContainerMetadata(name="noimg"),
                image=pb.ImageSpec(image="ctrd.test/absent:1"))), timeout=10) == \
            grpc.StatusCode.NOT_FOUND
        assert code_of(cri.container, pod, config, "relcwd", "true", working_dir="rel") == \
            grpc.StatusCode.INVALID_ARGUMENT
        # A negative grace period is none; stopping a created container does nothing.
        cri.runtime.StopContainer(pb.StopContainerRequest(container_id=c, timeout=-1),
                                  timeout=10)
        assert cri.status(c).state == pb.CONTAINER_CREATED
        # A failed create reserved nothing: the name can be used now.
        cri.container(pod, config, "relcwd", "true")
        # Removing a pod takes its containers with it.
        cri.runtime.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=pod), timeout=60)
        assert code_of(cri.container, pod, config, "late", "true") == \
            grpc.StatusCode.FAILED_PRECONDITION
    finally:
        cri.runtime.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=pod), timeout=60)
        cri.runtime.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=pod), timeout=60)
    assert not cri.runtime.ListContainers(pb.ListContainersRequest(
        filter=pb.ContainerFilter(pod_sandbox_id=pod)), timeout=10).containers


def test_daemon_restart_keeps_pods_and_notes_exits(cri: CRI) -> None:
    """SIGKILL the daemon with a pod running; a container that ends while it is down
    is reported EXITED with its code after the restart, the others keep running."""
    pod, config = cri.run_pod("survivor")
    try:
        stays = cri.container(pod, config, "stays", "sleep", "1000")
        ends = cri.container(pod, config, "ends", "sleep", "1000")
        for c in (stays, ends):
            cri.runtime.StartContainer(pb.StartContainerRequest(container_id=c), timeout=60)
        ends_pid = _task_pid(cri, ends)
        cri.daemon.kill()
        os.kill(ends_pid, 9)
        cri.daemon.start()
        status = cri.wait_exited(ends)
        assert status.exit_code == 137
        assert cri.status(stays).state == pb.CONTAINER_RUNNING
        pod_status = cri.runtime.PodSandboxStatus(
            pb.PodSandboxStatusRequest(pod_sandbox_id=pod), timeout=10).status
        assert pod_status.state == pb.SANDBOX_READY
        # The log of the running container is attached again.
        out = cri.runtime.ExecSync(pb.ExecSyncRequest(container_id=stays, cmd=["echo", "ok"]),
                                   timeout=30)
        assert out.stdout == b"ok\n"
    finally:
        cri.runtime.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=pod), timeout=60)
        cri.runtime.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=pod), timeout=60)


def _task_pid(cri: CRI, container: str) -> int:
    for line in cri.daemon.ctr("tasks", "ls", namespace="k8s.io").stdout.splitlines()[1:]:
        fields = line.split()
        if fields[0] == container:
            return int(fields[1])
    raise AssertionError(f"no task for {container}")


def _memory_limit(container: str) -> int:
    v1 = Path("/sys/fs/cgroup/memory/k8s.io", container, "memory.limit_in_bytes")
    v2 = Path("/sys/fs/cgroup/k8s.io", container, "memory.max")
    return int((v1 if v1.exists() else v2).read_text())


def test_stats_and_resource_update(cri: CRI) -> None:
    pod, config = cri.run_pod("stats")
    try:
        c = cri.container(pod, config, "busy", "sleep", "1000",
                          linux=pb.LinuxContainerConfig(resources=pb.LinuxContainerResources(
                              memory_limit_in_bytes=64 << 20)))
        cri.runtime.StartContainer(pb.StartContainerRequest(container_id=c), timeout=60)
        assert _memory_limit(c) == 64 << 20
        stats = cri.runtime.ContainerStats(pb.ContainerStatsRequest(container_id=c),
                                           timeout=30).stats
        assert stats.attributes.id == c and stats.attributes.metadata.name == "busy"
        assert stats.cpu.usage_core_nano_seconds.value > 0
        assert 0 < stats.memory.working_set_bytes.value <= stats.memory.usage_bytes.value
        assert 0 < stats.memory.available_bytes.value < 64 << 20
        cri.runtime.UpdateContainerResources(pb.UpdateContainerResourcesRequest(
            container_id=c, linux=pb.LinuxContainerResources(memory_limit_in_bytes=128 << 20)),
            timeout=30)
        assert _memory_limit(c) == 128 << 20
        assert cri.status(c).resources.linux.memory_limit_in_bytes == 128 << 20
        listed = cri.runtime.ListContainerStats(pb.ListContainerStatsRequest(
            filter=pb.ContainerStatsFilter(pod_sandbox_id=pod)), timeout=30).stats
        assert [s.attributes.id for s in listed] == [c]
        # Hostile updates change nothing.
        assert code_of(cri.runtime.UpdateContainerResources, pb.UpdateContainerResourcesRequest(
            container_id=c, linux=pb.LinuxContainerResources(memory_limit_in_bytes=-5)),
            timeout=30) == grpc.StatusCode.INVALID_ARGUMENT
        assert code_of(cri.runtime.UpdateContainerResources, pb.UpdateContainerResourcesRequest(
            container_id=c), timeout=30) == grpc.StatusCode.INVALID_ARGUMENT
        assert code_of(cri.runtime.UpdateContainerResources, pb.UpdateContainerResourcesRequest(
            container_id="0" * 64, linux=pb.LinuxContainerResources(cpu_shares=2)),
            timeout=30) == grpc.StatusCode.NOT_FOUND
        assert _memory_limit(c) == 128 << 20
        cri.runtime.StopContainer(pb.StopContainerRequest(container_id=c), timeout=60)
        stopped = cri.runtime.ContainerStats(pb.ContainerStatsRequest(container_id=c),
                                             timeout=30).stats
        assert stopped.attributes.id == c and not stopped.HasField("cpu")
    finally:
        cri.runtime.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=pod), timeout=60)
        cri.runtime.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=pod), timeout=60)


def test_concurrent_pods_get_distinct_addresses(cri: CRI) -> None:
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        pods = list(pool.map(lambda i: cri.run_pod(f"many{i}")[0], range(6)))
        try:
            ips = [cri.runtime.PodSandboxStatus(pb.PodSandboxStatusRequest(pod_sandbox_id=p),
                                                timeout=10).status.network.ip for p in pods]
            assert len(set(ips)) == 6 and all(ip.startswith(cri.subnet_prefix) for ip in ips)
        finally:
            list(pool.map(lambda p: cri.runtime.StopPodSandbox(
                pb.StopPodSandboxRequest(pod_sandbox_id=p), timeout=60), pods))
            list(pool.map(lambda p: cri.runtime.RemovePodSandbox(
                pb.RemovePodSandboxRequest(pod_sandbox_id=p), timeout=60), pods))
    assert not any((cri.base / "netns").iterdir())
    assert not [f for f in (cri.base / "ipam").rglob("10.253.*")]


def test_pod_stats(cri: CRI) -> None:
    pod, config = cri.run_pod("podstats")
    try:
        c = cri.container(pod, config, "worker", "sleep", "1000")
        cri.runtime.StartContainer(pb.StartContainerRequest(container_id=c), timeout=60)
        # Some traffic on the pod's interface: a ping of its own gateway.
        cri.runtime.ExecSync(pb.ExecSyncRequest(
            container_id=c, cmd=["ping", "-c", "1", "-W", "2", cri.subnet_prefix + "1"]),
            timeout=30)
        stats = cri.runtime.PodSandboxStats(pb.PodSandboxStatsRequest(pod_sandbox_id=pod),
                                            timeout=30).stats
        assert stats.attributes.id == pod and stats.attributes.metadata.name == "podstats"
        linux = stats.linux
        assert [s.attributes.id for s in linux.containers] == [c]
        assert linux.memory.working_set_bytes.value >= \
            linux.containers[0].memory.working_set_bytes.value > 0
        assert linux.cpu.usage_core_nano_seconds.value > 0
        assert linux.process.process_count.value >= 2  # pause and sleep
        assert linux.network.default_interface.name == "eth0"
        assert linux.network.default_interface.tx_bytes.value > 0
        listed = cri.runtime.ListPodSandboxStats(pb.ListPodSandboxStatsRequest(
            filter=pb.PodSandboxStatsFilter(id=pod)), timeout=30).stats
        assert [s.attributes.id for s in listed] == [pod]
        assert code_of(cri.runtime.PodSandboxStats, pb.PodSandboxStatsRequest(
            pod_sandbox_id="0" * 64), timeout=10) == grpc.StatusCode.NOT_FOUND
        cri.runtime.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=pod), timeout=60)
        stopped = cri.runtime.PodSandboxStats(pb.PodSandboxStatsRequest(pod_sandbox_id=pod),
                                              timeout=30).stats
        assert not stopped.HasField("linux")
    finally:
        cri.runtime.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=pod), timeout=60)
        cri.runtime.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=pod), timeout=60)


def test_container_events_stream(cri: CRI) -> None:
    stream = cri.runtime.GetContainerEvents(pb.GetEventsRequest())
    seen: list[tuple[str, int, int]] = []

    def read() -> None:
        try:
            for event in stream:
                seen.append((event.container_id, event.container_event_type,
                             len(event.containers_statuses)))
        except grpc.RpcError:
            pass  # cancelled below

    reader = threading.Thread(target=read)
    reader.start()
    try:
        time.sleep(1)  # the subscription is in place before anything happens
        pod, config = cri.run_pod("events")
        c = cri.container(pod, config, "short", "true")
        cri.runtime.StartContainer(pb.StartContainerRequest(container_id=c), timeout=60)
        cri.wait_exited(c)
        cri.runtime.RemoveContainer(pb.RemoveContainerRequest(container_id=c), timeout=60)
        cri.runtime.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=pod), timeout=60)
        cri.runtime.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=pod), timeout=60)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and len(seen) < 8:
            time.sleep(0.05)
    finally:
        stream.cancel()
        reader.join(10)
    created, started, stopped, deleted = (pb.CONTAINER_CREATED_EVENT, pb.CONTAINER_STARTED_EVENT,
                                          pb.CONTAINER_STOPPED_EVENT, pb.CONTAINER_DELETED_EVENT)
    assert [(i, kind) for i, kind, _ in seen] == [
        (pod, created), (pod, started), (c, created), (c, started), (c, stopped),
        (c, deleted), (pod, stopped), (pod, deleted)]
    # While the pod exists its status and its containers' come along.
    assert seen[2][2] == 1 and seen[-1][2] == 0


def test_ctr_events_show_cri_containers(cri: CRI) -> None:
    """CRI's containers are announced like any other: `ctr events` shows them."""
    watcher = subprocess.Popen(
        [CTR, "--address", cri.daemon.address, "--namespace", "k8s.io", "events"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        time.sleep(1)  # subscribed before the pod comes
        pod, _ = cri.run_pod("announced")
        cri.runtime.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=pod), timeout=60)
        cri.runtime.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=pod), timeout=60)
        time.sleep(1)  # the last events reach ctr
    finally:
        watcher.terminate()
        out, _ = watcher.communicate(timeout=10)
    lines = [line for line in out.splitlines() if pod in line]
    topics = [line.split()[5] for line in lines]  # date time zone UTC namespace topic
    assert topics[0] == "/containers/create" and topics[-1] == "/containers/delete", out
    assert "/tasks/start" in topics


def _seccomp_mode(cri: CRI, container: str) -> bytes:
    out = cri.runtime.ExecSync(pb.ExecSyncRequest(
        container_id=container, cmd=["sh", "-c", "grep Seccomp: /proc/self/status"]), timeout=30)
    return out.stdout.split()[1]


def test_kubelet_like_restart_and_log_rotation(cri: CRI) -> None:
    """What kubelet does over a pod's life: logs under <pod dir>/<name>/<attempt>.log,
    rotation by rename + ReopenContainerLog, a probe by ExecSync, a restart as a new
    container with the next attempt beside the exited one, then clean-up."""
    pod, config = cri.run_pod("kubelet")
    logs = Path(config.log_directory)
    (logs / "app").mkdir()
    counter = "i=0; while :; do echo line $i; i=$((i+1)); sleep 0.05; done"

    def app(attempt: int) -> str:
        return cri.runtime.CreateContainer(pb.CreateContainerRequest(
            pod_sandbox_id=pod, sandbox_config=config, config=pb.ContainerConfig(
                metadata=pb.ContainerMetadata(name="app", attempt=attempt),
                image=pb.ImageSpec(image=BUSYBOX), command=["sh", "-c", counter],
                log_path=f"app/{attempt}.log")), timeout=60).container_id

    def lines(path: Path) -> int:
        return len(path.read_text().splitlines()) if path.exists() else 0

    def grows(path: Path) -> None:
        deadline = time.monotonic() + 10
        start = lines(path)
        while time.monotonic() < deadline and lines(path) <= start + 2:
            time.sleep(0.05)
        assert lines(path) > start + 2, path

    try:
        first = app(0)
        cri.runtime.StartContainer(pb.StartContainerRequest(container_id=first), timeout=60)
        grows(logs / "app/0.log")
        rotated = logs / "app/0.log.20261130-000000"
        (logs / "app/0.log").rename(rotated)
        cri.runtime.ReopenContainerLog(pb.ReopenContainerLogRequest(container_id=first),
                                       timeout=30)
        grows(logs / "app/0.log")
        settled = lines(rotated)
        time.sleep(0.3)
        assert lines(rotated) == settled  # nothing more goes to the renamed file
        probe = cri.runtime.ExecSync(pb.ExecSyncRequest(container_id=first, cmd=["true"],
                                                        timeout=5), timeout=30)
        assert probe.exit_code == 0
        # A restart: the exited attempt stays until kubelet removes it.
        cri.runtime.StopContainer(pb.StopContainerRequest(container_id=first, timeout=1),
                                  timeout=60)
        assert code_of(cri.runtime.ReopenContainerLog, pb.ReopenContainerLogRequest(
            container_id=first), timeout=30) == grpc.StatusCode.FAILED_PRECONDITION
        second = app(1)
        cri.runtime.StartContainer(pb.StartContainerRequest(container_id=second), timeout=60)
        grows(logs / "app/1.log")
        states = {c.metadata.attempt: c.state for c in cri.runtime.ListContainers(
            pb.ListContainersRequest(filter=pb.ContainerFilter(pod_sandbox_id=pod)),
            timeout=10).containers}
        assert states == {0: pb.CONTAINER_EXITED, 1: pb.CONTAINER_RUNNING}
        cri.runtime.RemoveContainer(pb.RemoveContainerRequest(container_id=first), timeout=60)
        # The first attempt's name is free again once it is removed.
        assert app(0)
    finally:
        cri.runtime.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=pod), timeout=60)
        cri.runtime.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=pod), timeout=60)
