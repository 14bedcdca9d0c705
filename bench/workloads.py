"""The workloads: each prepares itself on a daemon, then measures one repetition at a time.

A workload never knows which daemon it is given; it drives both through the same
client (`ctr`, or ctrd.api's gRPC stubs where `ctr` has no bulk equivalent). Ids
carry the daemon's name because both daemons share the host's runc state and
cgroup paths, which are keyed by namespace and id only.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import os
import statistics
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import structlog
from google.protobuf import any_pb2

from ctrd.api.containerd.services.containers.v1 import containers_pb2, containers_pb2_grpc
from ctrd.api.containerd.services.images.v1 import images_pb2, images_pb2_grpc
from ctrd.api.containerd.types import descriptor_pb2

from . import images
from .cri import CNI_BIN_DIR, CRI_NAMESPACE, PAUSE_IMAGE, CriClient, netns_mounts
from .daemons import NAMESPACE, CommandFailed, Daemon
from .floor import RuncBundle
from .registry import Registry
from .report import Metric

MIB = 1 << 20
BLOB_IMAGE = "bench.local/blob-holder:latest"
SPEC_URL = "types.containerd.io/opencontainers/runtime-spec/1/Spec"
RUNTIME = "io.containerd.runc.v2"

log = structlog.get_logger()


@dataclass(frozen=True)
class Settings:
    reps: int
    blob_size: int  # bytes ingested and read back
    large_image: bool  # the Debian image for import and pull, else busybox
    concurrent: int  # containers started at once, and measured for memory
    creates: int  # containers created then deleted one by one
    listed: int  # containers present while listing
    # Samples per repetition of the quick workloads (run --rm, exec, ls); their median
    # is the repetition's value, which damps the noise of a busy machine.
    iterations: int

    @classmethod
    def full(cls, reps: int) -> Settings:
        return cls(reps, 1 << 30, True, 50, 200, 1000, 5)

    @classmethod
    def smoke(cls) -> Settings:
        return cls(1, 8 * MIB, False, 3, 5, 20, 1)


@dataclass
class Bench:
    """What workloads share: settings, a scratch folder, images built once, the registry."""

    settings: Settings
    workdir: Path
    _images: dict[str, images.BenchImage] = field(default_factory=dict)
    _imported: set[tuple[str, str, str]] = field(default_factory=set)
    _counter: itertools.count = field(default_factory=itertools.count)
    registry: Registry | None = None

    def unique(self, daemon: Daemon, prefix: str) -> str:
        return f"{prefix}-{daemon.name}-{next(self._counter)}"

    @property
    def busybox(self) -> images.BenchImage:
        if "busybox" not in self._images:
            self._images["busybox"] = images.busybox_image(self.workdir)
        return self._images["busybox"]

    @property
    def pause(self) -> images.BenchImage:
        if "pause" not in self._images:
            self._images["pause"] = images.pause_image(self.workdir, PAUSE_IMAGE)
        return self._images["pause"]

    @property
    def large(self) -> images.BenchImage:
        """The image import and pull move: Debian in full runs, busybox in smoke runs."""
        if not self.settings.large_image:
            return self.busybox
        if "debian" not in self._images:
            self._images["debian"] = images.debian_image(self.workdir)
        return self._images["debian"]

    def ensure_imported(self, daemon: Daemon, image: images.BenchImage,
                        namespace: str = NAMESPACE) -> None:
        if (daemon.name, namespace, image.name) not in self._imported:
            daemon.ctr("images", "import", str(image.archive), namespace=namespace)
            self._imported.add((daemon.name, namespace, image.name))

    def forget_imported(self, daemon: Daemon, image: images.BenchImage) -> None:
        self._imported.discard((daemon.name, NAMESPACE, image.name))

    def pushed(self, image: images.BenchImage) -> str:
        """The image's reference in the local registry, started and filled on first use."""
        if self.registry is None:
            self.registry = Registry(self.workdir / "registry")
            self.registry.start()
        return self.registry.push("bench/image", "latest", image.image)


class Workload:
    name: str = ""
    metrics: tuple[Metric, ...] = ()
    skip_reason: str = ""  # set when the workload is never run, with why

    def setup(self, bench: Bench, daemon: Daemon) -> None:
        """Prepare ``daemon``; raising here marks the workload unavailable on it."""

    def run(self, bench: Bench, daemon: Daemon, rep: int) -> dict[str, float]:
        raise NotImplementedError

    def teardown(self, bench: Bench, daemon: Daemon) -> None:
        sweep(daemon)

    def floor(self, bench: Bench, rep: int) -> dict[str, float]:
        """The same measurement without a daemon, where that makes sense."""
        return {}


def timed(fn, *args, **kwargs) -> float:
    start = time.perf_counter()
    fn(*args, **kwargs)
    return time.perf_counter() - start


def sweep(daemon: Daemon, namespace: str = NAMESPACE) -> None:
    """Delete every task and container of a namespace (the bench's); failures are ignored."""
    for kind, remove in (("tasks", ("tasks", "delete", "--force")),
                         ("containers", ("containers", "delete"))):
        listed = daemon.ctr(kind, "list", "--quiet", check=False, timeout=60,
                            namespace=namespace)
        if listed.returncode != 0:
            continue
        ids = listed.stdout.decode().split()
        for start in range(0, len(ids), 100):
            daemon.ctr(*remove, *ids[start:start + 100], check=False, timeout=120,
                       namespace=namespace)


def chain_ids(image: images.BenchImage) -> list[str]:
    """The snapshot names an unpack gives the image's layers, bottom first."""
    assert image.image.config is not None
    diff_ids = json.loads(image.image.config.data)["rootfs"]["diff_ids"]
    chain = [diff_ids[0]]
    for diff_id in diff_ids[1:]:
        chain.append("sha256:" + hashlib.sha256(f"{chain[-1]} {diff_id}".encode()).hexdigest())
    return chain


def purge_image(daemon: Daemon, image: images.BenchImage, ref: str) -> None:
    """Remove an image with its content and snapshots, so the next run starts cold.

    containerd's synchronous GC already does this; removing explicitly as well keeps
    a daemon whose GC is missing or lazy from getting warm runs.
    """
    daemon.ctr("images", "delete", "--sync", ref, check=False)
    for snapshot in reversed(chain_ids(image)):
        daemon.ctr("snapshots", "delete", snapshot, check=False)
    for blob in image.image.blobs:
        daemon.ctr("content", "delete", blob.digest, check=False)


def _parallel(commands: list[list[str]], daemon: Daemon) -> None:
    procs = [subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, env=daemon.env()) for cmd in commands]
    failures = []
    for cmd, proc in zip(commands, procs):
        _, err = proc.communicate()
        if proc.returncode != 0:
            failures.append(CommandFailed(cmd, proc.returncode, err.decode(errors="replace")))
    if failures:
        raise failures[0]


def _memory(pids: set[int]) -> tuple[int, int]:
    """(RSS, PSS) in bytes summed over ``pids``. RSS counts a page shared by several of
    them once per process (a forking zygote's pages once per shim); PSS splits each
    page among its sharers, so the sum is what they cost together."""
    rss = pss = 0
    for pid in pids:
        try:
            text = Path(f"/proc/{pid}/smaps_rollup").read_text()
        except OSError:
            continue  # exited meanwhile
        for line in text.splitlines():
            key, _, rest = line.partition(":")
            if key == "Rss":
                rss += int(rest.split()[0]) * 1024
            elif key == "Pss":
                pss += int(rest.split()[0]) * 1024
    return rss, pss


# ---------------------------------------------------------------------------


class Content(Workload):
    name = "content"

    def __init__(self, settings: Settings) -> None:
        size = f"{settings.blob_size / MIB:g} MiB"
        self.metrics = (
            Metric("content.ingest", f"content ingest {size}", "MiB/s", higher_is_better=True),
            Metric("content.get", f"content get {size}", "MiB/s", higher_is_better=True),
        )
        self.blob: Path | None = None
        self.digest = ""

    def setup(self, bench: Bench, daemon: Daemon) -> None:
        if self.blob is None:
            self.blob = bench.workdir / "blob"
            hasher = hashlib.sha256()
            with open(self.blob, "wb") as out:
                for start in range(0, bench.settings.blob_size, 16 * MIB):
                    chunk = os.urandom(min(16 * MIB, bench.settings.blob_size - start))
                    hasher.update(chunk)
                    out.write(chunk)
            self.digest = "sha256:" + hasher.hexdigest()

    def _hold(self, bench: Bench, daemon: Daemon) -> None:
        # `ctr content ingest` takes no lease, so the blob is garbage the moment it is
        # committed and a collection could remove it before `get`. An image pointing
        # at it keeps it, and can be made before the blob exists.
        target = descriptor_pb2.Descriptor(media_type="application/octet-stream",
                                           digest=self.digest, size=bench.settings.blob_size)
        with _channel(daemon) as (channel, metadata):
            try:
                images_pb2_grpc.ImagesStub(channel).Create(
                    images_pb2.CreateImageRequest(
                        image=images_pb2.Image(name=BLOB_IMAGE, target=target)),
                    metadata=metadata)
            except grpc.RpcError as exc:
                # A daemon without images may still store content; it then has no GC
                # that knows images either, so the blob is safe without the holder.
                if exc.code() != grpc.StatusCode.UNIMPLEMENTED:  # type: ignore[attr-defined]
                    raise

    def run(self, bench: Bench, daemon: Daemon, rep: int) -> dict[str, float]:
        assert self.blob is not None
        size = bench.settings.blob_size
        self._hold(bench, daemon)
        with open(self.blob, "rb") as source:
            ingest = timed(daemon.ctr, "content", "ingest", "--expected-size", str(size),
                           "--expected-digest", self.digest, f"bench-{rep}", stdin=source)
        get = timed(daemon.ctr, "content", "get", self.digest, stdout=subprocess.DEVNULL)
        # Removing the blob's record is not enough: while its file waits for the next
        # collection, both daemons take a new ingest of it without reading the data
        # (it "already exists"), and the next repetition would time nothing. Dropping
        # the holder with --sync waits for the collection that removes the file.
        daemon.ctr("images", "delete", "--sync", BLOB_IMAGE)
        return {"content.ingest": size / MIB / ingest, "content.get": size / MIB / get}

    def teardown(self, bench: Bench, daemon: Daemon) -> None:
        daemon.ctr("images", "delete", BLOB_IMAGE, check=False)
        daemon.ctr("content", "delete", self.digest, check=False)


class Import(Workload):
    name = "import"
    metrics = (Metric("import", "images import + unpack", "s"),)

    def setup(self, bench: Bench, daemon: Daemon) -> None:
        image = bench.large
        self.metrics = (Metric("import", f"images import + unpack ({_describe(image)})", "s"),)
        if image.note:
            log.warning("import runs on a fallback image", note=image.note)

    def run(self, bench: Bench, daemon: Daemon, rep: int) -> dict[str, float]:
        image = bench.large
        purge_image(daemon, image, image.name)
        bench.forget_imported(daemon, image)
        seconds = timed(daemon.ctr, "images", "import", str(image.archive))
        purge_image(daemon, image, image.name)
        return {"import": seconds}


class Pull(Workload):
    name = "pull"
    metrics = (Metric("pull", "images pull + unpack, local registry", "s"),)

    def setup(self, bench: Bench, daemon: Daemon) -> None:
        image = bench.large
        self.metrics = (Metric("pull", f"images pull + unpack ({_describe(image)})", "s"),)
        self.ref = bench.pushed(image)

    def run(self, bench: Bench, daemon: Daemon, rep: int) -> dict[str, float]:
        image = bench.large
        purge_image(daemon, image, self.ref)
        seconds = timed(daemon.ctr, "images", "pull", "--plain-http", self.ref)
        purge_image(daemon, image, self.ref)
        bench.forget_imported(daemon, image)
        return {"pull": seconds}


def _describe(image: images.BenchImage) -> str:
    kind = image.name.rpartition("/")[2]
    return f"{kind}, {len(image.image.blobs) - 2} layers, {image.size / MIB:.0f} MiB"


class Lifecycle(Workload):
    name = "lifecycle"
    metrics = (Metric("run.rm", "run --rm /bin/true", "s"),)

    def __init__(self) -> None:
        self.bundle: RuncBundle | None = None

    def setup(self, bench: Bench, daemon: Daemon) -> None:
        bench.ensure_imported(daemon, bench.busybox)

    def run(self, bench: Bench, daemon: Daemon, rep: int) -> dict[str, float]:
        return {"run.rm": statistics.median(
            timed(daemon.ctr, "run", "--rm", bench.busybox.name, bench.unique(daemon, "life"),
                  "/bin/true") for _ in range(bench.settings.iterations))}

    def floor(self, bench: Bench, rep: int) -> dict[str, float]:
        if self.bundle is None:
            self.bundle = RuncBundle(bench.workdir / "runc-floor")
            self.bundle.prepare(bench.busybox.image)
        try:
            return {"run.rm": statistics.median(
                self.bundle.run_once(f"ctrd-bench-floor-{rep}-{i}")
                for i in range(bench.settings.iterations))}
        finally:
            self.bundle.cleanup()


class Concurrent(Workload):
    """N containers started at once, their memory while running, then torn down at once."""

    name = "concurrent"

    def __init__(self, settings: Settings) -> None:
        n = settings.concurrent
        self.metrics = (
            Metric("concurrent.start", f"{n} concurrent run -d", "s"),
            Metric("concurrent.pss", f"PSS per container, {n} running (daemon+shims)", "MiB"),
            Metric("concurrent.rss", f"RSS per container, {n} running (daemon+shims)", "MiB"),
            Metric("concurrent.pss_daemon", f"  of which the daemon's PSS, {n} running", "MiB"),
            Metric("concurrent.pss_shim", f"  of which PSS per shim, {n} running", "MiB"),
            Metric("concurrent.teardown", f"{n} concurrent kill+rm", "s"),
        )

    def setup(self, bench: Bench, daemon: Daemon) -> None:
        bench.ensure_imported(daemon, bench.busybox)

    def run(self, bench: Bench, daemon: Daemon, rep: int) -> dict[str, float]:
        n = bench.settings.concurrent
        ids = [bench.unique(daemon, "conc") for _ in range(n)]
        start = timed(_parallel, [daemon.ctr_cmd("run", "-d", bench.busybox.name, cid,
                                                 "sleep", "3600") for cid in ids], daemon)
        # The daemon, its helpers (ctrd's shim zygote) and its shims only: the
        # containers' own processes are the same busybox in both cases and would only
        # blur the difference.
        shims = set(daemon.shim_pids())
        rss_daemon, pss_daemon = _memory({daemon.pid, *daemon.child_pids()})
        rss_shims, pss_shims = _memory(shims)
        rss, pss = rss_daemon + rss_shims, pss_daemon + pss_shims
        teardown = timed(_parallel, [daemon.ctr_cmd("tasks", "delete", "--force", cid)
                                     for cid in ids], daemon)
        teardown += timed(_parallel, [daemon.ctr_cmd("containers", "delete", cid)
                                      for cid in ids], daemon)
        return {"concurrent.start": start, "concurrent.pss": pss / n / MIB,
                "concurrent.rss": rss / n / MIB,
                "concurrent.pss_daemon": pss_daemon / MIB,
                "concurrent.pss_shim": pss_shims / max(len(shims), 1) / MIB,
                "concurrent.teardown": teardown}


class Exec(Workload):
    name = "exec"
    metrics = (Metric("exec", "task exec /bin/true", "s"),)

    def __init__(self) -> None:
        self.containers: dict[str, str] = {}  # daemon name -> its long-running container

    def setup(self, bench: Bench, daemon: Daemon) -> None:
        bench.ensure_imported(daemon, bench.busybox)
        container = bench.unique(daemon, "exec")
        daemon.ctr("run", "-d", bench.busybox.name, container, "sleep", "3600")
        self.containers[daemon.name] = container
        # The probe: one exec, so that a daemon without exec is caught before measuring.
        daemon.ctr("tasks", "exec", "--exec-id", "probe", container, "/bin/true")

    def run(self, bench: Bench, daemon: Daemon, rep: int) -> dict[str, float]:
        container = self.containers[daemon.name]
        samples = [timed(daemon.ctr, "tasks", "exec", "--exec-id", f"e{rep}-{i}", container,
                         "/bin/true") for i in range(bench.settings.iterations)]
        return {"exec": statistics.median(samples)}


class CreateDelete(Workload):
    name = "create-delete"

    def __init__(self, settings: Settings) -> None:
        n = settings.creates
        self.metrics = (
            Metric("containers.create", f"{n} containers create (sequential)", "s"),
            Metric("containers.delete", f"{n} containers delete (sequential)", "s"),
        )

    def setup(self, bench: Bench, daemon: Daemon) -> None:
        bench.ensure_imported(daemon, bench.busybox)

    def run(self, bench: Bench, daemon: Daemon, rep: int) -> dict[str, float]:
        ids = [bench.unique(daemon, "cd") for _ in range(bench.settings.creates)]
        create = sum(timed(daemon.ctr, "containers", "create", bench.busybox.name, cid)
                     for cid in ids)
        delete = sum(timed(daemon.ctr, "containers", "delete", cid) for cid in ids)
        return {"containers.create": create, "containers.delete": delete}


class ListContainers(Workload):
    """`ctr containers ls` with many containers present, made through the gRPC API."""

    name = "containers-ls"

    def __init__(self, settings: Settings) -> None:
        self.metrics = (Metric("containers.ls", f"containers ls, {settings.listed} present",
                               "s"),)

    def setup(self, bench: Bench, daemon: Daemon) -> None:
        spec = any_pb2.Any(type_url=SPEC_URL, value=b"{}")
        with _channel(daemon) as (channel, metadata):
            stub = containers_pb2_grpc.ContainersStub(channel)
            for _ in range(bench.settings.listed):
                container = containers_pb2.Container(
                    id=bench.unique(daemon, "ls"), image=bench.busybox.name,
                    runtime=containers_pb2.Container.Runtime(name=RUNTIME), spec=spec)
                stub.Create(containers_pb2.CreateContainerRequest(container=container),
                            metadata=metadata)

    def run(self, bench: Bench, daemon: Daemon, rep: int) -> dict[str, float]:
        return {"containers.ls": statistics.median(
            timed(daemon.ctr, "containers", "list") for _ in range(bench.settings.iterations))}

    def teardown(self, bench: Bench, daemon: Daemon) -> None:
        with _channel(daemon) as (channel, metadata):
            stub = containers_pb2_grpc.ContainersStub(channel)
            try:
                listed = stub.List(containers_pb2.ListContainersRequest(), metadata=metadata)
            except grpc.RpcError:
                return
            for container in listed.containers:
                try:
                    stub.Delete(containers_pb2.DeleteContainerRequest(id=container.id),
                                metadata=metadata)
                except grpc.RpcError:
                    pass


class _channel:
    """A gRPC channel to the daemon, with the metadata that puts calls in the bench namespace."""

    def __init__(self, daemon: Daemon) -> None:
        self.channel = grpc.insecure_channel(f"unix://{daemon.address}")

    def __enter__(self) -> tuple[grpc.Channel, list[tuple[str, str]]]:
        return self.channel, [("containerd-namespace", NAMESPACE)]

    def __exit__(self, *exc: object) -> None:
        self.channel.close()


class CriPodStart(Workload):
    """A pod as kubelet starts one over CRI v1: the sandbox (pause process, network
    namespace, CNI bridge network), then one container in it, created and started;
    and the pod's teardown, stop then remove. The client is a gRPC stub, the same for
    both daemons."""

    name = "cri"
    metrics = (
        Metric("cri.start", "CRI pod start (RunPodSandbox + CreateContainer + StartContainer)",
               "s"),
        Metric("cri.sandbox", "  of which RunPodSandbox", "s"),
        Metric("cri.teardown", "CRI pod teardown (StopPodSandbox + RemovePodSandbox)", "s"),
    )

    def __init__(self) -> None:
        self.clients: dict[str, CriClient] = {}  # daemon name -> its client
        self.pods: dict[str, list[str]] = {}  # daemon name -> ids of the pods it ran
        if not (CNI_BIN_DIR / "bridge").exists():
            self.skip_reason = f"no CNI plugins in {CNI_BIN_DIR} (containernetworking-plugins)"

    def setup(self, bench: Bench, daemon: Daemon) -> None:
        for image in (bench.pause, bench.busybox):
            bench.ensure_imported(daemon, image, namespace=CRI_NAMESPACE)
        client = CriClient(daemon.address)
        self.clients[daemon.name] = client
        client.wait_ready([PAUSE_IMAGE, bench.busybox.name])
        # One pod unmeasured: it probes that the daemon can run pods at all, and pays
        # the one-off costs (the bridge's creation, the first snapshot of each image).
        self._pod(bench, daemon, client)

    def run(self, bench: Bench, daemon: Daemon, rep: int) -> dict[str, float]:
        client = self.clients[daemon.name]
        samples = [self._pod(bench, daemon, client) for _ in range(bench.settings.iterations)]
        return {key: statistics.median(sample[key] for sample in samples)
                for key in samples[0]}

    def _pod(self, bench: Bench, daemon: Daemon, client: CriClient) -> dict[str, float]:
        name = bench.unique(daemon, "pod")
        # kubelet makes the pod's log folder before asking for the pod.
        logs = bench.workdir / "cri-logs" / name
        logs.mkdir(parents=True)
        config = client.pod_config(name, logs, self._cgroup_parent(daemon))
        start = time.perf_counter()
        pod = client.run_pod(config)
        sandbox = time.perf_counter() - start
        self.pods.setdefault(daemon.name, []).append(pod)
        container = client.start_container(pod, config, bench.busybox.name, ["sleep", "1000"])
        started = time.perf_counter() - start
        if not client.is_running(container):
            raise RuntimeError(f"container {container} of pod {name} is not running")
        teardown = timed(client.remove_pod, pod)
        return {"cri.start": started, "cri.sandbox": sandbox, "cri.teardown": teardown}

    @staticmethod
    def _cgroup_parent(daemon: Daemon) -> str:
        # Under the bench's own cgroup, which the bench's final cleanup also removes.
        return f"/{NAMESPACE}/cri-{daemon.name}"

    def teardown(self, bench: Bench, daemon: Daemon) -> None:
        client = self.clients.pop(daemon.name, None)
        if client is not None:
            try:
                left = client.remove_all()
                if left:
                    log.warning("pods left by the workload, removed", daemon=daemon.name,
                                pods=left)
            except grpc.RpcError as exc:
                log.warning("could not remove pods over CRI", daemon=daemon.name,
                            error=exc.code().name)  # type: ignore[attr-defined]
            finally:
                client.close()
        # Whatever CRI could not remove goes through containerd's API.
        sweep(daemon, CRI_NAMESPACE)
        if daemon.network is not None:
            daemon.network.remove(self.pods.pop(daemon.name, []))
        for hierarchy in _cgroup_hierarchies():
            _remove_cgroup_tree(hierarchy / self._cgroup_parent(daemon).lstrip("/"))
            # Where a pod without a cgroup parent would have gone; shared with other
            # users of k8s.io, so only the folder itself, and only when empty.
            _rmdir(hierarchy / CRI_NAMESPACE)
        _rmdir(Path("/run/containerd/runc") / CRI_NAMESPACE)
        if mounts := netns_mounts(daemon.base):
            log.warning("network namespaces still mounted", daemon=daemon.name, mounts=mounts)


def _cgroup_hierarchies() -> list[Path]:
    # cgroup v2 has one hierarchy, at the root; v1 one per controller folder (and
    # "unified" beside them on a hybrid host).
    root = Path("/sys/fs/cgroup")
    if (root / "cgroup.controllers").exists():
        return [root]
    return [p for p in root.iterdir() if p.is_dir()]


def _remove_cgroup_tree(top: Path) -> None:
    """Remove a cgroup of the bench's and its descendants; rmdir refuses busy ones."""
    if not top.is_dir():
        return
    for child in sorted((c for c in top.rglob("*") if c.is_dir()), reverse=True):
        _rmdir(child)
    _rmdir(top)


def _rmdir(path: Path) -> None:
    try:
        path.rmdir()
    except OSError:
        pass


def all_workloads(settings: Settings) -> list[Workload]:
    return [Content(settings), Import(), Pull(), Lifecycle(), Concurrent(settings), Exec(),
            CreateDelete(settings), ListContainers(settings), CriPodStart()]
