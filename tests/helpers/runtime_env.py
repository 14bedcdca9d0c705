"""What task tests share: a busybox rootfs folder, daemons wired to a chosen shim,
a raw gRPC client for what `ctr` cannot send, and a thorough cleanup.

Shims are parametrized: ``runc`` is Debian's containerd-shim-runc-v2, ``ctrd`` is ours.
Teardown kills and deletes every task, stops the daemon, then makes sure no shim,
runc container, mount or cgroup of the test is left, killing by PID only what the
test's own daemon started.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc

from ctrd.api.containerd.services.containers.v1 import containers_pb2 as cpb
from ctrd.api.containerd.services.containers.v1 import containers_pb2_grpc as cpb_grpc
from ctrd.api.containerd.services.tasks.v1 import tasks_pb2_grpc as tpb_grpc
from ctrd.oci.busybox import GROUP, PASSWD, applets

from .ctrd_proc import CtrdProcess, new_base
from .procs import shim_pids

SHIMS = {"runc": "containerd-shim-runc-v2", "ctrd": "containerd-shim-ctrd-v2"}
RUNC_ROOT = Path("/run/containerd/runc")
CGROUP_ROOT = Path("/sys/fs/cgroup")
OCI_SPEC_TYPE = "types.containerd.io/opencontainers/runtime-spec/1/Spec"


def config_for(shim: str) -> str:
    return ('[plugins."io.containerd.runtime.v2.task".shims]\n'
            f'  "io.containerd.runc.v2" = "{SHIMS[shim]}"\n')


def make_rootfs(parent: Path) -> Path:
    """A busybox rootfs folder: every applet a symlink in /bin, plus passwd and group."""
    root = parent / "rootfs"
    for d in ("bin", "dev", "etc", "proc", "sys", "tmp", "root", "usr/bin", "var"):
        (root / d).mkdir(parents=True, exist_ok=True)
    os.chmod(root / "tmp", 0o1777)
    shutil.copy2("/bin/busybox", root / "bin/busybox")
    for name in applets():
        link = root / "bin" / name
        if not link.exists():
            link.symlink_to("busybox")
    (root / "etc/passwd").write_text(PASSWD)
    (root / "etc/group").write_text(GROUP)
    return root


def new_id(prefix: str = "t") -> str:
    return f"{prefix}{uuid.uuid4().hex[:10]}"


class RawClient:
    """containers.v1 and tasks.v1 over gRPC, for requests `ctr` never makes."""

    def __init__(self, address: str, namespace: str = "default") -> None:
        self.channel = grpc.insecure_channel(f"unix://{address}")
        self.containers = cpb_grpc.ContainersStub(self.channel)
        self.tasks = tpb_grpc.TasksStub(self.channel)
        self.md = [("containerd-namespace", namespace)]

    def create_container(self, cid: str, spec: bytes,
                         runtime: str = "io.containerd.runc.v2") -> cpb.Container:
        c = cpb.Container(id=cid)
        c.runtime.name = runtime
        c.spec.type_url = OCI_SPEC_TYPE
        c.spec.value = spec
        return self.containers.Create(cpb.CreateContainerRequest(container=c),
                                      metadata=self.md, timeout=30).container

    def call(self, method: str, request, timeout: float = 30):
        return getattr(self.tasks, method)(request, metadata=self.md, timeout=timeout)

    def close(self) -> None:
        self.channel.close()


def _ctr_lines(daemon: CtrdProcess, *args: str, namespace: str = "default") -> list[str]:
    r = daemon.ctr(*args, namespace=namespace, check=False, timeout=30)
    return [line.strip() for line in r.stdout.splitlines() if line.strip()]


def remove_everything(daemon: CtrdProcess) -> None:
    """Kill and delete every task and container of every namespace, through the API."""
    if daemon.proc is None or daemon.proc.poll() is not None:
        return
    for ns in _ctr_lines(daemon, "namespaces", "ls", "-q"):
        for tid in _ctr_lines(daemon, "tasks", "ls", "-q", namespace=ns):
            daemon.ctr("tasks", "kill", "-s", "SIGKILL", "--all", tid, namespace=ns, check=False)
            for _ in range(50):
                r = daemon.ctr("tasks", "rm", tid, namespace=ns, check=False)
                if r.returncode == 0 or "not found" in r.stderr:
                    break
                time.sleep(0.1)
        for cid in _ctr_lines(daemon, "containers", "ls", "-q", namespace=ns):
            daemon.ctr("containers", "rm", cid, namespace=ns, check=False)


def leftovers(daemon: CtrdProcess, ids: list[str], namespace: str = "default") -> list[str]:
    """What a test left behind: shims, runc containers, cgroups, mounts."""
    # A shim answers Shutdown before it exits: give the last ones a moment.
    deadline = time.monotonic() + 5
    while shim_pids(daemon.address) and time.monotonic() < deadline:
        time.sleep(0.1)
    found = [f"shim pid {p}" for p in shim_pids(daemon.address)]
    for cid in ids:
        if (RUNC_ROOT / namespace / cid).exists():
            found.append(f"runc state {namespace}/{cid}")
        for sub in ("memory", "pids", "cpu", "freezer", "unified"):
            path = CGROUP_ROOT / sub / namespace / cid
            if path.exists():
                found.append(f"cgroup {path}")
    mounts = Path("/proc/self/mounts").read_text()
    found += [f"mount {line.split()[1]}" for line in mounts.splitlines()
              if line.split()[1].startswith(str(daemon.base))]
    return found


def force_cleanup(daemon: CtrdProcess, ids: list[str], namespace: str = "default") -> None:
    """Last resort after a failed test: kill our shims by PID, delete runc leftovers."""
    for pid in shim_pids(daemon.address):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    for cid in ids:
        if (RUNC_ROOT / namespace / cid).exists():
            subprocess.run(["runc", "--root", str(RUNC_ROOT / namespace), "delete", "--force",
                            cid], capture_output=True, check=False)
        for sub in ("memory", "pids", "cpu", "cpuacct", "cpuset", "blkio", "devices",
                    "freezer", "systemd", "unified"):
            path = CGROUP_ROOT / sub / namespace / cid
            if path.exists():
                try:
                    path.rmdir()
                except OSError:
                    pass


class Runtime:
    """A daemon wired to one shim, with the ids its test used, for cleanup."""

    def __init__(self, shim: str, rootfs: Path) -> None:
        self.shim = shim
        self.rootfs = rootfs
        self.daemon = CtrdProcess(new_base(), config_text=config_for(shim))
        self.ids: list[str] = []
        self._client: RawClient | None = None

    def start(self) -> "Runtime":
        self.daemon.start()
        return self

    def new_id(self, prefix: str = "t") -> str:
        cid = new_id(prefix)
        self.ids.append(cid)
        return cid

    def ctr(self, *args: str, **kw) -> subprocess.CompletedProcess:
        return self.daemon.ctr(*args, **kw)

    def run(self, cid: str, *cmd: str, flags: tuple[str, ...] = ("--rm",), **kw):
        return self.ctr("run", *flags, "--rootfs", str(self.rootfs), cid, *cmd, **kw)

    @property
    def raw(self) -> RawClient:
        if self._client is None:
            self._client = RawClient(self.daemon.address)
        return self._client

    def task_status(self, cid: str) -> str | None:
        for line in self.ctr("tasks", "ls").stdout.splitlines()[1:]:
            parts = line.split()
            if parts and parts[0] == cid:
                return parts[-1]
        return None

    def wait_status(self, cid: str, status: str, timeout: float = 10) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.task_status(cid) == status:
                return
            time.sleep(0.1)
        raise AssertionError(f"task {cid} never reached {status}: {self.task_status(cid)}")

    def close(self) -> list[str]:
        """Clean up; returns what was left behind before forcing (empty when all is well)."""
        if self._client is not None:
            self._client.close()
        try:
            remove_everything(self.daemon)
        finally:
            self.daemon.stop()
        left = leftovers(self.daemon, self.ids)
        if left:
            force_cleanup(self.daemon, self.ids)
        base = self.daemon.base
        mounts = [line.split()[1] for line in Path("/proc/self/mounts").read_text().splitlines()]
        for target in sorted((m for m in mounts if m.startswith(str(base))), reverse=True):
            subprocess.run(["umount", "-l", target], check=False)
        shutil.rmtree(base, ignore_errors=True)
        return left


def rootfs_dir() -> Iterator[Path]:
    parent = Path(tempfile.mkdtemp(prefix="ctrd-rootfs-", dir="/tmp"))
    try:
        yield make_rootfs(parent)
    finally:
        shutil.rmtree(parent, ignore_errors=True)


def delete_runc_under(folder: Path, namespace: str) -> None:
    """Last resort: ``runc delete --force`` every container of ``namespace`` whose bundle
    lies under ``folder`` (a daemon that died or lost track of them left them)."""
    root = RUNC_ROOT / namespace
    if not root.exists():
        return
    listed = subprocess.run(["runc", "--root", str(root), "list", "--format", "json"],
                            capture_output=True, text=True, check=False)
    for entry in json.loads(listed.stdout or "null") or []:
        if entry.get("bundle", "").startswith(str(folder)):
            subprocess.run(["runc", "--root", str(root), "delete", "--force", entry["id"]],
                           capture_output=True, check=False)
