"""The reference: Debian's containerd 1.6, started on a private temporary root.

Tests that compare ctrd with containerd use the fixtures below. Each daemon gets its
own root, state, sockets and plugin paths under one temporary folder, so it never
touches the system's containerd, ctrd, or another test's daemon; the CRI plugin is
off. On teardown, tasks are killed, containers and their shims removed, the daemon
stopped, leftover mounts under the folder unmounted and the folder deleted, even
when the test failed.

    from helpers.containerd_ref import containerd_ref  # noqa: F401  (the fixture)

    def test_x(containerd_ref):
        containerd_ref.ctr("images", "import", "img.tar")

The object offers the same ``address``, ``ctr()`` and ``log()`` as ``CtrdProcess``, so
a test can be parametrized over both daemons.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from .daemon_proc import DaemonProc
from .procs import shim_pids

CONTAINERD = shutil.which("containerd") or "/usr/bin/containerd"
SHIM = "containerd-shim-runc-v2"
# Fixed paths of containerd 1.6's runc shim, shared by every daemon on the machine.
SOCKET_ROOT = "/run/containerd"
RUNC_ROOT = "/run/containerd/runc"

# Plugins that would reach outside the temporary root or need what is not here.
_DISABLED_PLUGINS = [
    "io.containerd.grpc.v1.cri",
    "io.containerd.snapshotter.v1.aufs",
    "io.containerd.snapshotter.v1.btrfs",
    "io.containerd.snapshotter.v1.devmapper",
    "io.containerd.snapshotter.v1.zfs",
    "io.containerd.tracing.processor.v1.otlp",
    "io.containerd.internal.v1.tracing",
]


def available() -> bool:
    return all(shutil.which(tool) for tool in ("containerd", "ctr", SHIM, "runc"))


requires_containerd = pytest.mark.skipif(
    not available(), reason="containerd, ctr, containerd-shim-runc-v2 and runc are needed"
)


@dataclass
class ContainerdRef(DaemonProc):
    NAME = "containerd"

    @property
    def config_path(self) -> Path:
        return self.base / "config.toml"

    def config_text(self) -> str:
        disabled = ", ".join(f'"{p}"' for p in _DISABLED_PLUGINS)
        return (
            "version = 2\n"
            f'root = "{self.root}"\n'
            f'state = "{self.state}"\n'
            f"disabled_plugins = [{disabled}]\n"
            "[grpc]\n"
            f'  address = "{self.address}"\n'
            "[ttrpc]\n"
            f'  address = "{self.address}.ttrpc"\n'
            "[debug]\n"
            '  level = "debug"\n'
            '[plugins."io.containerd.internal.v1.opt"]\n'
            f'  path = "{self.base / "opt"}"\n'
        )

    def start(self, timeout: float = 30.0) -> ContainerdRef:
        self.config_path.write_text(self.config_text())
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [CONTAINERD, "--config", str(self.config_path)],
                stdout=log, stderr=log, start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"containerd exited {self.proc.returncode}:\n{self.log()}")
            if Path(self.address).is_socket() and self.ctr("version", check=False).returncode == 0:
                return self
            time.sleep(0.05)
        raise RuntimeError(f"containerd did not come up in {timeout}s:\n{self.log()}")

    def namespaces(self) -> list[str]:
        r = self.ctr("namespaces", "list", "--quiet", check=False, timeout=20)
        return r.stdout.split() if r.returncode == 0 else []

    def _remove_workloads(self) -> list[str]:
        """Kill every task and delete every container, which also ends their shims.

        Returns the namespaces seen.
        """
        namespaces = self.namespaces()
        for ns in namespaces:
            tasks = self.ctr("tasks", "list", "--quiet", namespace=ns, check=False, timeout=20)
            for task in tasks.stdout.split():
                self.ctr("tasks", "kill", "--all", "--signal", "SIGKILL", task,
                         namespace=ns, check=False, timeout=20)
                self.ctr("tasks", "delete", "--force", task, namespace=ns, check=False,
                         timeout=20)
            containers = self.ctr("containers", "list", "--quiet", namespace=ns, check=False,
                                  timeout=20)
            for container in containers.stdout.split():
                self.ctr("containers", "delete", container, namespace=ns, check=False,
                         timeout=20)
        return namespaces

    def _kill_own_shims(self) -> None:
        """Kill shims this daemon started that outlived it: they name its socket."""
        for pid in shim_pids(self.address):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def stop(self, timeout: float = 20.0) -> None:
        namespaces: list[str] = []
        if self.proc is not None and self.proc.poll() is None:
            try:
                namespaces = self._remove_workloads()
            finally:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
        leftovers = self._leftover_containers()
        for ns, cid in leftovers:
            # The runc shim keeps runc's state under this root, per namespace. Killing
            # the shim alone would leave the container's processes running.
            subprocess.run(["runc", "--root", f"{RUNC_ROOT}/{ns}", "delete", "--force", cid],
                           capture_output=True, check=False, timeout=30)
        self._kill_own_shims()
        for ns, cid in leftovers:
            self._remove_shim_files(ns, cid)
        remove_namespace_dirs(namespaces + [ns for ns, _ in leftovers])

    def _leftover_containers(self) -> list[tuple[str, str]]:
        """(namespace, id) of bundles left when the daemon died before deleting them."""
        tasks = self.state / "io.containerd.runtime.v2.task"
        if not tasks.is_dir():
            return []
        return [(b.parent.name, b.name) for b in sorted(tasks.glob("*/*"))]

    def _remove_shim_files(self, ns: str, cid: str) -> None:
        """Remove the shim socket and ctr's fifos that a killed shim could not remove."""
        # The shim's socket is named by a hash of the daemon address, namespace and id.
        name = hashlib.sha256(f"{self.address}/{ns}/{cid}".encode()).hexdigest()
        Path(SOCKET_ROOT, "s", name).unlink(missing_ok=True)
        for fifo in Path(SOCKET_ROOT, "fifo").glob(f"*/{cid}-std*"):
            fifo.unlink(missing_ok=True)
            try:
                fifo.parent.rmdir()
            except OSError:
                pass

    def cleanup(self) -> None:
        """Stop everything and remove the temporary folder, mounts first."""
        try:
            self.stop()
        finally:
            mounts = [line.split()[1] for line in Path("/proc/mounts").read_text().splitlines()]
            for target in sorted((m for m in mounts if m.startswith(str(self.base) + "/")),
                                 reverse=True):
                subprocess.run(["umount", "-l", target], check=False)
            shutil.rmtree(self.base, ignore_errors=True)


def remove_namespace_dirs(namespaces: list[str]) -> None:
    """Remove the per-namespace parent cgroups (``/<namespace>``) that `ctr run` leaves,
    and runc's per-namespace state folder.

    Only empty ones go: rmdir refuses a cgroup that still has children or processes,
    and a folder with entries, so whatever another daemon is using stays.
    """
    cgroups = Path("/sys/fs/cgroup")
    # cgroup v2 keeps it under the root itself, v1 under each controller's hierarchy.
    parents = [cgroups, *(p for p in cgroups.iterdir() if p.is_dir()), Path(RUNC_ROOT)]
    for ns in set(namespaces):
        for parent in parents:
            try:
                (parent / ns).rmdir()
            except OSError:
                pass


def new_containerd(prefix: str = "containerd-ref-") -> ContainerdRef:
    """A started reference daemon; the caller must call ``cleanup()``."""
    ref = ContainerdRef(Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp")))
    try:
        return ref.start()
    except BaseException:
        ref.cleanup()
        raise


def _reference() -> Iterator[ContainerdRef]:
    if not available():
        pytest.skip("containerd, ctr, containerd-shim-runc-v2 and runc are needed")
    ref = new_containerd()
    try:
        yield ref
    finally:
        ref.cleanup()


@pytest.fixture
def containerd_ref() -> Iterator[ContainerdRef]:
    """A reference containerd for one test."""
    yield from _reference()


@pytest.fixture(scope="module")
def containerd_ref_module() -> Iterator[ContainerdRef]:
    """A reference containerd shared by the tests of a module (cheaper, less isolated)."""
    yield from _reference()
