"""CRI v1, differential: the same calls against ctrd and against Debian's containerd 1.6.

Both daemons run side by side for the module, each with its own temporary root, CNI
bridge on a private /24, IPAM, netns and cache folders, and both import the same
busybox-static images. The tests check what a kubelet would notice: the fields it
reads, the state machine, the log format and the gRPC codes of bad requests.

containerd is the reference: every assertion states containerd's behaviour and is run
against both daemons. The one kind of difference kept on purpose is the gRPC code of a
bad request where containerd answers UNKNOWN (an error of no kind) or accepts what
cannot be meant (an empty pod or container name): ctrd answers with the specific code
(NotFound, AlreadyExists, InvalidArgument, FailedPrecondition); each such case names
ctrd's code next to containerd's. ListImages' filter is the other: containerd 1.6
ignores it, ctrd applies it.

containerd's CRI plugin keeps the CNI results cache at /var/lib/cni, which no option
moves. It therefore runs in a mount namespace of its own in which /var/lib is a
temporary folder; its netns mounts live under its state folder and vanish with that
namespace.
"""
from __future__ import annotations

import json
import random
import re
import secrets
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from functools import cached_property
from pathlib import Path

import grpc
import pytest
from helpers.containerd_ref import CONTAINERD, ContainerdRef, available, remove_namespace_dirs
from helpers.ctrd_proc import CtrdProcess
from helpers.daemon_proc import DaemonProc

from ctrd.api.k8s.cri.runtime.v1 import api_pb2 as pb
from ctrd.api.k8s.cri.runtime.v1 import api_pb2_grpc as rpc
from ctrd.oci import busybox, writer

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not Path("/usr/lib/cni/bridge").exists(),
                       reason="needs containernetworking-plugins"),
    pytest.mark.skipif(not available() or not shutil.which("unshare"),
                       reason="needs containerd, ctr, runc, its shim and unshare"),
]

PAUSE = "ctrd.test/pause:1"
BUSYBOX = "ctrd.test/busybox:1"
MISSING = "ctrd.test/absent:1"
NAMESPACE = "k8s.io"
CNI_BIN = "/usr/lib/cni"
UNKNOWN_ID = "0123456789abcdef" * 4
# An RFC 3339 time as CRI log lines start with it (Go's RFC3339Nano).
LOG_TIME = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{1,9})?(Z|[+-]\d\d:\d\d)$")

Code = grpc.StatusCode


# -- the two daemons -----------------------------------------------------------------------


class CRIContainerd(ContainerdRef):
    """containerd with its CRI plugin on, every path of it under ``base``."""

    def __init__(self, base: Path, cni_conf: Path) -> None:
        super().__init__(base)
        self.cni_conf = cni_conf

    def config_text(self) -> str:
        # Only the plugins that would reach outside the temporary root are off.
        disabled = ", ".join(f'"io.containerd.snapshotter.v1.{s}"'
                             for s in ("aufs", "btrfs", "devmapper", "zfs"))
        return f"""version = 2
root = "{self.root}"
state = "{self.state}"
disabled_plugins = [{disabled}, "io.containerd.tracing.processor.v1.otlp",
                    "io.containerd.internal.v1.tracing"]
[grpc]
  address = "{self.address}"
[ttrpc]
  address = "{self.address}.ttrpc"
[debug]
  level = "debug"
[plugins."io.containerd.internal.v1.opt"]
  path = "{self.base / 'opt'}"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{PAUSE}"
  netns_mounts_under_state_dir = true
  # The pause container's -998 needs CAP_SYS_RESOURCE, which this host may not grant.
  restrict_oom_score_adj = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
[plugins."io.containerd.grpc.v1.cri".cni]
  bin_dir = "{CNI_BIN}"
  conf_dir = "{self.cni_conf}"
"""

    def start(self, timeout: float = 30.0) -> CRIContainerd:
        self.config_path.write_text(self.config_text())
        var_lib = self.base / "var-lib"
        (var_lib / "cni").mkdir(parents=True)
        # unshare and sh exec in turn: the PID is containerd's own.
        script = 'mount --bind "$1" /var/lib && exec "$2" --config "$3"'
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh",
                 str(var_lib), CONTAINERD, str(self.config_path)],
                stdout=log, stderr=log, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"containerd exited {self.proc.returncode}:\n{self.log()}")
            if Path(self.address).is_socket() and self.ctr("version", check=False).returncode == 0:
                return self
            time.sleep(0.05)
        raise RuntimeError(f"containerd did not come up in {timeout}s:\n{self.log()}")


@dataclass
class Side:
    """One daemon under test and its CRI stubs."""

    name: str
    daemon: DaemonProc
    base: Path
    bridge: str
    subnet_prefix: str
    channel: grpc.Channel | None = None
    pods: list[str] = field(default_factory=list)  # every pod made, for the teardown

    @property
    def runtime(self) -> rpc.RuntimeServiceStub:
        return rpc.RuntimeServiceStub(self.channel)

    @property
    def images(self) -> rpc.ImageServiceStub:
        return rpc.ImageServiceStub(self.channel)

    def pod_config(self, name: str, **kw) -> pb.PodSandboxConfig:
        kw.setdefault("hostname", name)
        kw.setdefault("log_directory", str(self.base / "logs" / name))
        return pb.PodSandboxConfig(
            metadata=pb.PodSandboxMetadata(name=name, uid=secrets.token_hex(8),
                                           namespace="compat", attempt=1), **kw)

    def run_pod(self, config: pb.PodSandboxConfig, handler: str = "") -> str:
        if config.log_directory:
            Path(config.log_directory).mkdir(parents=True, exist_ok=True)
        pod = self.runtime.RunPodSandbox(pb.RunPodSandboxRequest(
            config=config, runtime_handler=handler), timeout=60).pod_sandbox_id
        self.pods.append(pod)
        return pod

    def new_pod(self, name: str, **kw) -> tuple[str, pb.PodSandboxConfig]:
        config = self.pod_config(name, **kw)
        return self.run_pod(config), config

    def container_config(self, name: str, *command: str, **kw) -> pb.ContainerConfig:
        kw.setdefault("log_path", f"{name}.log")
        kw.setdefault("image", pb.ImageSpec(image=BUSYBOX))
        return pb.ContainerConfig(metadata=pb.ContainerMetadata(name=name, attempt=2),
                                  command=list(command), **kw)

    def create(self, pod: str, pod_config: pb.PodSandboxConfig,
               config: pb.ContainerConfig) -> str:
        return self.runtime.CreateContainer(pb.CreateContainerRequest(
            pod_sandbox_id=pod, config=config, sandbox_config=pod_config),
            timeout=60).container_id

    def start(self, container: str) -> None:
        self.runtime.StartContainer(pb.StartContainerRequest(container_id=container),
                                    timeout=60)

    def status(self, container: str) -> pb.ContainerStatus:
        return self.runtime.ContainerStatus(
            pb.ContainerStatusRequest(container_id=container), timeout=10).status

    def pod_status(self, pod: str) -> pb.PodSandboxStatus:
        return self.runtime.PodSandboxStatus(
            pb.PodSandboxStatusRequest(pod_sandbox_id=pod), timeout=10).status

    def wait_exited(self, container: str, timeout: float = 15) -> pb.ContainerStatus:
        deadline = time.monotonic() + timeout
        while True:
            status = self.status(container)
            if status.state == pb.CONTAINER_EXITED or time.monotonic() > deadline:
                assert status.state == pb.CONTAINER_EXITED, f"{container} did not exit"
                return status
            time.sleep(0.05)

    def exec_sync(self, container: str, *cmd: str, timeout: int = 0) -> pb.ExecSyncResponse:
        return self.runtime.ExecSync(pb.ExecSyncRequest(container_id=container, cmd=list(cmd),
                                                        timeout=timeout), timeout=30)

    def stop_pod(self, pod: str) -> None:
        self.runtime.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=pod), timeout=60)

    def remove_pod(self, pod: str) -> None:
        self.runtime.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=pod),
                                      timeout=60)

    def drop_pod(self, pod: str) -> None:
        self.stop_pod(pod)
        self.remove_pod(pod)


def _free_third_octet(taken: set[int]) -> int:
    """A 10.252.x.0/24 no address or route of the host uses; random, as other test runs
    may be choosing at the same time."""
    used = subprocess.run(["ip", "-4", "-o", "addr"], capture_output=True, text=True,
                          check=True).stdout
    used += subprocess.run(["ip", "-4", "route"], capture_output=True, text=True,
                           check=True).stdout
    for third in random.sample(range(256), 256):
        if third not in taken and f"10.252.{third}." not in used:
            return third
    raise RuntimeError("no free 10.252.x.0/24 on this host")


def _write_cni_conf(folder: Path, bridge: str, subnet: str, ipam_dir: Path) -> None:
    folder.mkdir(parents=True)
    (folder / "10-compat.conflist").write_text(json.dumps({
        "cniVersion": "1.0.0", "name": f"compat-{bridge}",
        "plugins": [{"type": "bridge", "bridge": bridge, "isGateway": True, "ipMasq": False,
                     "ipam": {"type": "host-local", "ranges": [[{"subnet": subnet}]],
                              "dataDir": str(ipam_dir)}}],
    }))


def _make_side(name: str, taken: set[int]) -> Side:
    base = Path(tempfile.mkdtemp(prefix=f"ctrd-compat-{name}-", dir="/tmp"))
    third = _free_third_octet(taken)
    taken.add(third)
    bridge = f"cmp{name[:4]}{secrets.token_hex(2)}"
    _write_cni_conf(base / "net.d", bridge, f"10.252.{third}.0/24", base / "ipam")
    daemon: DaemonProc
    if name == "containerd":
        daemon = CRIContainerd(base, base / "net.d")
    else:
        (base / "netns").mkdir()
        daemon = CtrdProcess(base, config_text=f"""
[plugins."io.containerd.grpc.v1.cri"]
sandbox_image = "{PAUSE}"
netns_dir = "{base / 'netns'}"
restrict_oom_score_adj = true
[plugins."io.containerd.grpc.v1.cri".cni]
bin_dir = "{CNI_BIN}"
conf_dir = "{base / 'net.d'}"
cache_dir = "{base / 'cni-cache'}"
""")
    return Side(name, daemon, base, bridge, f"10.252.{third}.")


def _remove_pods(side: Side) -> None:
    """Stop and remove, through CRI, every pod a test left: that is what releases their
    addresses and veths. Errors are left to the cleanup that follows."""
    stub = side.runtime
    try:
        listed = {p.id for p in stub.ListPodSandbox(pb.ListPodSandboxRequest(),
                                                    timeout=10).items}
    except grpc.RpcError:
        listed = set()
    for pod in sorted(listed | set(side.pods)):
        for call, request in ((stub.StopPodSandbox, pb.StopPodSandboxRequest),
                              (stub.RemovePodSandbox, pb.RemovePodSandboxRequest)):
            try:
                call(request(pod_sandbox_id=pod), timeout=60)
            except grpc.RpcError:
                pass


def _teardown(side: Side) -> None:
    daemon = side.daemon
    try:
        if side.channel is not None:
            if daemon.proc is not None and daemon.proc.poll() is None:
                _remove_pods(side)
            side.channel.close()
    finally:
        try:
            if isinstance(daemon, ContainerdRef):
                daemon.cleanup()  # tasks, shims, the daemon, its mounts and folder
            else:
                daemon.stop()
        finally:
            subprocess.run(["ip", "link", "del", side.bridge], capture_output=True,
                           check=False)
            mounts = [line.split()[1]
                      for line in Path("/proc/mounts").read_text().splitlines()]
            for target in sorted((m for m in mounts if m.startswith(str(side.base) + "/")),
                                 reverse=True):
                subprocess.run(["umount", "-l", target], check=False)
            shutil.rmtree(side.base, ignore_errors=True)


@pytest.fixture(scope="module")
def images() -> dict[str, writer.Image]:
    pause = busybox.busybox_image(config=writer.ImageConfig(cmd=["sleep", "1000000"]))
    return {PAUSE: pause, BUSYBOX: busybox.busybox_image()}


@pytest.fixture(scope="module")
def sides(images: dict[str, writer.Image]) -> Iterator[dict[str, Side]]:
    made: list[Side] = []
    try:
        archive_dir = Path(tempfile.mkdtemp(prefix="ctrd-compat-img-", dir="/tmp"))
        try:
            archive = archive_dir / "images.tar"
            writer.write_oci_archive(archive, images)
            taken: set[int] = set()
            for name in ("containerd", "ctrd"):
                side = _make_side(name, taken)
                made.append(side)
                side.daemon.start()
                side.daemon.ctr("images", "import", str(archive), namespace=NAMESPACE)
                side.channel = grpc.insecure_channel(f"unix://{side.daemon.address}")
        finally:
            shutil.rmtree(archive_dir, ignore_errors=True)
        yield {side.name: side for side in made}
    finally:
        _teardown_all(made)


def _teardown_all(made: list[Side]) -> None:
    # Every daemon is torn down, whatever the one before raised; the first error wins.
    errors: list[Exception] = []
    for side in made:
        try:
            _teardown(side)
        except Exception as error:  # noqa: BLE001 - raised below, after the others
            errors.append(error)
    remove_namespace_dirs([NAMESPACE])
    if errors:
        raise errors[0]


def both() -> pytest.MarkDecorator:
    """Run a test on both daemons."""
    return pytest.mark.parametrize("which", ["containerd", "ctrd"])


@pytest.fixture
def side(sides: dict[str, Side], which: str) -> Side:
    return sides[which]


class Stage:
    """Objects the hostile requests aim at, made once per daemon on first use: a ready
    pod with a running, a created and an exited container, and a stopped pod."""

    def __init__(self, side: Side) -> None:
        self.side = side

    @cached_property
    def pod(self) -> tuple[str, pb.PodSandboxConfig]:
        return self.side.new_pod("stage")

    @cached_property
    def running(self) -> str:
        c = self.side.create(*self.pod, self.side.container_config("running", "sleep", "1000"))
        self.side.start(c)
        return c

    @cached_property
    def created(self) -> str:
        return self.side.create(*self.pod, self.side.container_config("created", "true"))

    @cached_property
    def exited(self) -> str:
        c = self.side.create(*self.pod, self.side.container_config("exited", "true"))
        self.side.start(c)
        self.side.wait_exited(c)
        return c

    @cached_property
    def stopped_pod(self) -> tuple[str, pb.PodSandboxConfig]:
        pod, config = self.side.new_pod("stopped")
        self.side.stop_pod(pod)
        return pod, config


@pytest.fixture(scope="module")
def stages(sides: dict[str, Side]) -> dict[str, Stage]:
    # The pods go with the daemons' teardown.
    return {name: Stage(side) for name, side in sides.items()}


def _outcome(call: Callable[[], object]) -> Code:
    """The gRPC code a call ends with, OK included."""
    try:
        call()
    except grpc.RpcError as error:
        return error.code()
    return Code.OK


def _log_time_ns(stamp: str) -> int:
    """Nanoseconds since the epoch of a log line's RFC 3339 time (nine digits at most,
    which ``datetime`` alone cannot read)."""
    match = LOG_TIME.match(stamp)
    assert match, stamp
    whole = datetime.fromisoformat(stamp[:19] + (match[2].replace("Z", "+00:00")))
    return int(whole.timestamp()) * 10**9 + int((match[1] or ".0")[1:].ljust(9, "0"))


def _log_records(path: Path, last: str, timeout: float = 10) -> list[tuple[str, str, str, str]]:
    """(time, stream, tag, text) of each line of a CRI log, once ``last`` is in it."""
    deadline = time.monotonic() + timeout
    while last not in path.read_text() and time.monotonic() < deadline:
        time.sleep(0.05)
    return [tuple(line.split(" ", 3)) for line in path.read_text().splitlines()]  # type: ignore[misc]


# -- runtime and images --------------------------------------------------------------------


@both()
def test_version_shape(side: Side) -> None:
    version = side.runtime.Version(pb.VersionRequest(version="v1"), timeout=10)
    assert version.version == "0.1.0" and version.runtime_api_version == "v1"
    # The runtime's own name and version differ by design: only their presence is kept.
    assert version.runtime_name and version.runtime_version


@both()
def test_status_conditions(side: Side) -> None:
    status = side.runtime.Status(pb.StatusRequest(), timeout=10).status
    assert [(c.type, c.status, c.reason, c.message) for c in status.conditions] == [
        ("RuntimeReady", True, "", ""), ("NetworkReady", True, "", "")]


@both()
def test_imported_image_fields(side: Side, images: dict[str, writer.Image]) -> None:
    listed = {tag: image for image in side.images.ListImages(
        pb.ListImagesRequest(), timeout=10).images for tag in image.repo_tags}
    assert {PAUSE, BUSYBOX} <= set(listed)
    source = images[BUSYBOX]
    image = listed[BUSYBOX]
    assert source.config is not None
    assert image.id == source.config.digest
    assert list(image.repo_tags) == [BUSYBOX]
    # The content size: manifest, config and compressed layers.
    assert image.size == sum(blob.size for blob in source.blobs) > 0
    assert not image.HasField("uid") and image.username == ""
    for ref in (BUSYBOX, image.id, image.id.removeprefix("sha256:")):
        status = side.images.ImageStatus(pb.ImageStatusRequest(image=pb.ImageSpec(image=ref)),
                                         timeout=10)
        assert status.image == image, ref


@both()
def test_imported_image_has_no_repo_digests(side: Side) -> None:
    status = side.images.ImageStatus(pb.ImageStatusRequest(image=pb.ImageSpec(image=BUSYBOX)),
                                     timeout=10)
    assert list(status.image.repo_digests) == []


@both()
def test_missing_image_is_an_empty_answer(side: Side) -> None:
    for ref in (MISSING, "ctrd.test/busybox", "sha256:" + "0" * 64):
        status = side.images.ImageStatus(pb.ImageStatusRequest(image=pb.ImageSpec(image=ref)),
                                         timeout=10)
        assert not status.HasField("image"), ref


@both()
def test_image_status_by_short_id(side: Side, images: dict[str, writer.Image]) -> None:
    config = images[BUSYBOX].config
    assert config is not None
    short = config.digest.removeprefix("sha256:")[:12]
    status = side.images.ImageStatus(pb.ImageStatusRequest(image=pb.ImageSpec(image=short)),
                                     timeout=10)
    assert status.image.id == config.digest


@both()
def test_list_images_filter(side: Side) -> None:
    """containerd 1.6 ignores ListImagesRequest.filter and lists every image; ctrd applies
    it (kubelet sends none, a person who sends one means it)."""
    listed = side.images.ListImages(pb.ListImagesRequest(
        filter=pb.ImageFilter(image=pb.ImageSpec(image=MISSING))), timeout=10).images
    tags = {tag for image in listed for tag in image.repo_tags}
    if side.name == "containerd":
        assert {PAUSE, BUSYBOX} <= tags
    else:
        assert not tags
    only = side.images.ListImages(pb.ListImagesRequest(
        filter=pb.ImageFilter(image=pb.ImageSpec(image=BUSYBOX))), timeout=10).images
    assert BUSYBOX in {tag for image in only for tag in image.repo_tags}


# -- pods ----------------------------------------------------------------------------------


@both()
def test_pod_lifecycle(side: Side) -> None:
    config = side.pod_config("lifecycle", labels={"app": "web", "tier": "front"},
                             annotations={"note": "kept as given"})
    pod = side.run_pod(config)
    status = side.pod_status(pod)
    assert status.id == pod and status.state == pb.SANDBOX_READY
    assert status.metadata == config.metadata
    assert status.created_at > 0 and status.runtime_handler == ""
    assert status.network.ip.startswith(side.subnet_prefix)
    assert dict(status.labels) == dict(config.labels)
    assert dict(status.annotations) == dict(config.annotations)

    def listed(**kw) -> list[str]:
        return [p.id for p in side.runtime.ListPodSandbox(pb.ListPodSandboxRequest(
            filter=pb.PodSandboxFilter(**kw)), timeout=10).items]

    item = next(p for p in side.runtime.ListPodSandbox(pb.ListPodSandboxRequest(),
                                                       timeout=10).items if p.id == pod)
    assert (item.metadata, item.state, item.created_at) == \
        (config.metadata, pb.SANDBOX_READY, status.created_at)
    assert dict(item.labels) == dict(config.labels)
    assert dict(item.annotations) == dict(config.annotations)
    assert listed(id=pod[:12]) == [pod]
    assert listed(label_selector={"app": "web"}) == [pod]
    assert listed(label_selector={"app": "db"}) == []
    ready = pb.PodSandboxStateValue(state=pb.SANDBOX_READY)
    not_ready = pb.PodSandboxStateValue(state=pb.SANDBOX_NOTREADY)
    assert pod in listed(state=ready) and pod not in listed(state=not_ready)

    side.stop_pod(pod)
    side.stop_pod(pod)
    assert side.pod_status(pod).state == pb.SANDBOX_NOTREADY
    assert pod in listed(state=not_ready)
    side.remove_pod(pod)
    side.remove_pod(pod)
    assert _outcome(lambda: side.pod_status(pod)) == Code.NOT_FOUND
    assert listed(id=pod) == []


@both()
def test_stopped_pod_reports_no_ip(side: Side) -> None:
    pod, _ = side.new_pod("noip")
    side.stop_pod(pod)
    try:
        status = side.pod_status(pod)
        assert status.network.ip == "" and not status.network.additional_ips
    finally:
        side.remove_pod(pod)


@both()
def test_remove_without_stop(side: Side) -> None:
    """RemoveContainer stops a running container, RemovePodSandbox a ready pod."""
    pod, config = side.new_pod("hasty")
    c = side.create(pod, config, side.container_config("busy", "sleep", "1000"))
    side.start(c)
    side.runtime.RemoveContainer(pb.RemoveContainerRequest(container_id=c), timeout=60)
    assert _outcome(lambda: side.status(c)) == Code.NOT_FOUND
    side.remove_pod(pod)
    assert _outcome(lambda: side.pod_status(pod)) == Code.NOT_FOUND


# -- containers ----------------------------------------------------------------------------


@both()
def test_container_lifecycle_and_log(side: Side, images: dict[str, writer.Image]) -> None:
    pod, pod_config = side.new_pod("logs")
    config = side.container_config(
        "say", "sh", "-c", "echo out-line; echo err-line >&2; printf partial; exit 3",
        labels={"role": "talker"}, annotations={"why": "logs"})
    c = side.create(pod, pod_config, config)
    image_id = images[BUSYBOX].config.digest  # type: ignore[union-attr]
    created = side.status(c)
    assert (created.id, created.metadata, created.state) == \
        (c, config.metadata, pb.CONTAINER_CREATED)
    assert created.created_at > 0 and created.started_at == created.finished_at == 0
    assert (created.exit_code, created.reason, created.message) == (0, "", "")
    assert (created.image.image, created.image_ref) == (BUSYBOX, image_id)
    assert dict(created.labels) == dict(config.labels)
    assert dict(created.annotations) == dict(config.annotations)
    log_path = Path(pod_config.log_directory) / "say.log"
    assert created.log_path == str(log_path)
    item, = side.runtime.ListContainers(pb.ListContainersRequest(
        filter=pb.ContainerFilter(id=c)), timeout=10).containers
    assert (item.pod_sandbox_id, item.metadata, item.image.image, item.image_ref,
            item.state, item.created_at) == \
        (pod, config.metadata, BUSYBOX, image_id, pb.CONTAINER_CREATED, created.created_at)

    side.start(c)
    exited = side.wait_exited(c)
    assert (exited.exit_code, exited.reason, exited.message) == (3, "Error", "")
    # containerd stamps started_at after Start returns, so a process as quick as this
    # one may seem to finish before it started: only the order against creation holds.
    assert min(exited.finished_at, exited.started_at) >= exited.created_at
    records = _log_records(log_path, "partial")
    assert all(LOG_TIME.match(r[0]) for r in records), records
    assert {r[1:] for r in records} == {("stdout", "F", "out-line"),
                                        ("stderr", "F", "err-line"),
                                        ("stdout", "P", "partial")}
    stdout_times = [_log_time_ns(r[0]) for r in records if r[1] == "stdout"]
    assert stdout_times == sorted(stdout_times)
    assert abs(stdout_times[0] - exited.started_at) < 60 * 10**9

    ok = side.create(pod, pod_config, side.container_config("fine", "true"))
    side.start(ok)
    assert side.wait_exited(ok).reason == "Completed"
    # Stopping what has exited and removing twice are no errors.
    side.runtime.StopContainer(pb.StopContainerRequest(container_id=c, timeout=2), timeout=60)
    assert side.status(c).state == pb.CONTAINER_EXITED
    for _ in range(2):
        side.runtime.RemoveContainer(pb.RemoveContainerRequest(container_id=c), timeout=60)
    assert _outcome(lambda: side.status(c)) == Code.NOT_FOUND
    side.drop_pod(pod)


@both()
def test_running_container_status(side: Side, stages: dict[str, Stage]) -> None:
    stage = stages[side.name]
    status = side.status(stage.running)
    assert status.state == pb.CONTAINER_RUNNING
    assert status.started_at >= status.created_at > 0 and status.finished_at == 0
    assert (status.exit_code, status.reason, status.message) == (0, "", "")


@both()
def test_container_status_reports_resources(side: Side, stages: dict[str, Stage]) -> None:
    pod, config = stages[side.name].pod
    resources = pb.LinuxContainerResources(cpu_shares=512, memory_limit_in_bytes=64 << 20)
    c = side.create(pod, config, side.container_config(
        "limited", "true", linux=pb.LinuxContainerConfig(resources=resources)))
    linux = side.status(c).resources.linux
    assert (linux.cpu_shares, linux.memory_limit_in_bytes) == (512, 64 << 20)


@both()
def test_exec_sync(side: Side, stages: dict[str, Stage]) -> None:
    running = stages[side.name].running
    out = side.exec_sync(running, "sh", "-c", "echo o; printf e >&2; exit 7")
    assert (out.stdout, out.stderr, out.exit_code) == (b"o\n", b"e", 7)
    assert side.exec_sync(running, "true").exit_code == 0
    started = time.monotonic()
    assert _outcome(lambda: side.exec_sync(running, "sleep", "10", timeout=1)) == \
        Code.DEADLINE_EXCEEDED
    assert time.monotonic() - started < 8


# -- hostile requests ----------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    id: str
    call: Callable[[Side, Stage], object]
    code: Code  # containerd's answer
    ctrd: Code | None = None  # ctrd's more specific answer, where it differs on purpose


def _unknown_id_cases(bad: str, label: str) -> list[Case]:
    """Every call that takes a pod or container id, given ``bad``."""
    def rt(s: Side) -> rpc.RuntimeServiceStub:
        return s.runtime

    calls: list[tuple[str, Callable[[Side, Stage], object]]] = [
        ("PodSandboxStatus", lambda s, _: rt(s).PodSandboxStatus(
            pb.PodSandboxStatusRequest(pod_sandbox_id=bad), timeout=10)),
        ("StopPodSandbox", lambda s, _: rt(s).StopPodSandbox(
            pb.StopPodSandboxRequest(pod_sandbox_id=bad), timeout=10)),
        ("RemovePodSandbox", lambda s, _: rt(s).RemovePodSandbox(
            pb.RemovePodSandboxRequest(pod_sandbox_id=bad), timeout=10)),
        ("PodSandboxStats", lambda s, _: rt(s).PodSandboxStats(
            pb.PodSandboxStatsRequest(pod_sandbox_id=bad), timeout=10)),
        ("PortForward", lambda s, _: rt(s).PortForward(
            pb.PortForwardRequest(pod_sandbox_id=bad, port=[80]), timeout=10)),
        ("CreateContainer", lambda s, st: rt(s).CreateContainer(pb.CreateContainerRequest(
            pod_sandbox_id=bad, config=s.container_config("orphan", "true"),
            sandbox_config=st.pod[1]), timeout=10)),
        ("ContainerStatus", lambda s, _: rt(s).ContainerStatus(
            pb.ContainerStatusRequest(container_id=bad), timeout=10)),
        ("StartContainer", lambda s, _: rt(s).StartContainer(
            pb.StartContainerRequest(container_id=bad), timeout=10)),
        ("StopContainer", lambda s, _: rt(s).StopContainer(
            pb.StopContainerRequest(container_id=bad, timeout=1), timeout=10)),
        ("RemoveContainer", lambda s, _: rt(s).RemoveContainer(
            pb.RemoveContainerRequest(container_id=bad), timeout=10)),
        ("ExecSync", lambda s, _: rt(s).ExecSync(
            pb.ExecSyncRequest(container_id=bad, cmd=["true"]), timeout=10)),
        ("Exec", lambda s, _: rt(s).Exec(
            pb.ExecRequest(container_id=bad, cmd=["true"], stdout=True), timeout=10)),
        ("Attach", lambda s, _: rt(s).Attach(
            pb.AttachRequest(container_id=bad, stdout=True), timeout=10)),
        ("ContainerStats", lambda s, _: rt(s).ContainerStats(
            pb.ContainerStatsRequest(container_id=bad), timeout=10)),
        ("UpdateContainerResources", lambda s, _: rt(s).UpdateContainerResources(
            pb.UpdateContainerResourcesRequest(
                container_id=bad, linux=pb.LinuxContainerResources(cpu_shares=512)),
            timeout=10)),
        ("ReopenContainerLog", lambda s, _: rt(s).ReopenContainerLog(
            pb.ReopenContainerLogRequest(container_id=bad), timeout=10)),
    ]
    cases = []
    for name, call in calls:
        removal = name.startswith("Remove")
        # containerd: removing what does not exist succeeds, the rest is NotFound...
        ours = Code.OK if removal else Code.NOT_FOUND
        if bad:
            cases.append(Case(f"{name}-{label}", call, ours))
        else:
            # ...but its id index refuses an empty id with an error of no kind.
            cases.append(Case(f"{name}-{label}", call, Code.UNKNOWN, ours))
    return cases


def _stop_negative_timeout(s: Side, st: Stage) -> None:
    c = s.create(*st.pod, s.container_config("negstop", "sleep", "1000"))
    s.start(c)
    s.runtime.StopContainer(pb.StopContainerRequest(container_id=c, timeout=-1), timeout=30)
    # containerd takes a negative grace period as none: SIGKILL at once.
    status = s.status(c)
    assert (status.state, status.exit_code) == (pb.CONTAINER_EXITED, 137)


def _create_duplicate(s: Side, st: Stage) -> None:
    assert st.running  # the first "running" of this attempt exists
    s.create(*st.pod, s.container_config("running", "true"))


def _run_and_drop_pod(s: Side, config: pb.PodSandboxConfig, handler: str = "") -> None:
    s.drop_pod(s.run_pod(config, handler))


def _image_status(ref: str) -> Callable[[Side, Stage], object]:
    return lambda s, _: s.images.ImageStatus(
        pb.ImageStatusRequest(image=pb.ImageSpec(image=ref)), timeout=10)


CASES: list[Case] = [
    *_unknown_id_cases(UNKNOWN_ID, "unknown"),
    *_unknown_id_cases("", "empty"),
    Case("RunPodSandbox-empty-name",
         lambda s, _: _run_and_drop_pod(s, s.pod_config("", hostname="noname")),
         Code.OK, Code.INVALID_ARGUMENT),
    Case("RunPodSandbox-duplicate-name",
         lambda s, st: s.runtime.RunPodSandbox(pb.RunPodSandboxRequest(config=st.pod[1]),
                                               timeout=30),
         Code.UNKNOWN, Code.ALREADY_EXISTS),
    Case("RunPodSandbox-unknown-handler",
         lambda s, _: _run_and_drop_pod(s, s.pod_config("handler"), "no-such-handler"),
         Code.UNKNOWN, Code.INVALID_ARGUMENT),
    Case("RunPodSandbox-handler-runc",
         lambda s, _: _run_and_drop_pod(s, s.pod_config("runc"), "runc"), Code.OK),
    Case("CreateContainer-empty-name",
         lambda s, st: s.create(*st.pod, s.container_config("", "true")),
         Code.OK, Code.INVALID_ARGUMENT),
    Case("CreateContainer-duplicate-name", _create_duplicate,
         Code.UNKNOWN, Code.ALREADY_EXISTS),
    Case("CreateContainer-missing-image",
         lambda s, st: s.create(*st.pod, s.container_config(
             "noimage", "true", image=pb.ImageSpec(image=MISSING))),
         Code.NOT_FOUND),
    Case("CreateContainer-stopped-pod",
         lambda s, st: s.create(*st.stopped_pod, s.container_config("late", "true")),
         Code.NOT_FOUND, Code.FAILED_PRECONDITION),
    Case("StartContainer-exited",
         lambda s, st: s.start(st.exited),
         Code.UNKNOWN, Code.FAILED_PRECONDITION),
    Case("StopContainer-negative-timeout", _stop_negative_timeout, Code.OK),
    Case("ExecSync-empty-cmd", lambda s, st: s.exec_sync(st.running),
         Code.UNKNOWN, Code.INVALID_ARGUMENT),
    Case("ExecSync-negative-timeout",
         lambda s, st: s.exec_sync(st.running, "true", timeout=-1), Code.OK),
    Case("ExecSync-created", lambda s, st: s.exec_sync(st.created, "true"),
         Code.UNKNOWN, Code.FAILED_PRECONDITION),
    Case("ExecSync-exited", lambda s, st: s.exec_sync(st.exited, "true"),
         Code.UNKNOWN, Code.FAILED_PRECONDITION),
    Case("ExecSync-missing-binary", lambda s, st: s.exec_sync(st.running, "/no/such/file"),
         Code.UNKNOWN),
    Case("ImageStatus-empty", _image_status(""),
         Code.UNKNOWN, Code.INVALID_ARGUMENT),
    Case("ImageStatus-malformed", _image_status("UPPER/Case::bad"), Code.OK),
]


@pytest.mark.parametrize("which", ["containerd", "ctrd"])
@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_hostile_request_code(case: Case, side: Side, stages: dict[str, Stage]) -> None:
    stage = stages[side.name]
    expected = case.ctrd if side.name == "ctrd" and case.ctrd is not None else case.code
    assert _outcome(lambda: case.call(side, stage)) == expected
