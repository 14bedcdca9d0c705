"""Our shim (containerd-shim-ctrd-v2) driven by the real containerd 1.6 and ctr.

A private containerd (root, state and sockets in a temp folder) runs with the
venv's bin folder on PATH, so ``--runtime io.containerd.ctrd.v2`` resolves to our
shim. A one-layer busybox image is written as an OCI archive and imported.
Everything is torn down at the end: tasks, containerd, shims, mounts, runc state.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from helpers.containerd_ref import remove_namespace_dirs
from helpers.procs import shim_pids

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root"),
    pytest.mark.skipif(not all(shutil.which(b) for b in ("containerd", "ctr", "runc")),
                       reason="containerd, ctr and runc are needed"),
]

RUNTIME = "io.containerd.ctrd.v2"
IMAGE = "docker.io/library/shimtest:latest"
BUSYBOX = "/usr/bin/busybox" if os.path.exists("/usr/bin/busybox") else "/bin/busybox"
APPLETS = ("sh", "cat", "echo", "sleep", "true", "head", "tr", "wc", "tty", "ps")


def _tar(entries: list[tuple[str, str, bytes | str | None]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as t:
        for name, kind, data in entries:
            ti = tarfile.TarInfo(name)
            if kind == "dir":
                ti.type, ti.mode = tarfile.DIRTYPE, 0o755
                t.addfile(ti)
            elif kind == "link":
                ti.type, ti.linkname, ti.mode = tarfile.SYMTYPE, str(data), 0o777
                t.addfile(ti)
            else:
                assert isinstance(data, bytes)
                ti.size, ti.mode = len(data), 0o755
                t.addfile(ti, io.BytesIO(data))
    return buf.getvalue()


def write_image(path: Path) -> None:
    """A one-layer OCI archive holding busybox, named IMAGE for ``ctr images import``."""
    entries: list[tuple[str, str, bytes | str | None]] = [
        ("bin", "dir", None), ("bin/busybox", "file", Path(BUSYBOX).read_bytes())]
    entries += [(f"bin/{a}", "link", "busybox") for a in APPLETS]
    entries += [(d, "dir", None) for d in ("dev", "proc", "sys", "tmp", "etc")]
    blobs: dict[str, bytes] = {}

    def blob(data: bytes) -> str:
        digest = hashlib.sha256(data).hexdigest()
        blobs[digest] = data
        return f"sha256:{digest}"

    layer = _tar(entries)
    config = json.dumps({"architecture": "amd64", "os": "linux",
                         "config": {"Cmd": ["sh"], "Env": ["PATH=/bin"]},
                         "rootfs": {"type": "layers", "diff_ids": [blob(layer)]}}).encode()
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": blob(config), "size": len(config)},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar",
                    "digest": blob(layer), "size": len(layer)}]}).encode()
    index = json.dumps({"schemaVersion": 2, "manifests": [{
        "mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": blob(manifest),
        "size": len(manifest), "platform": {"architecture": "amd64", "os": "linux"},
        "annotations": {"io.containerd.image.name": IMAGE}}]}).encode()
    archive: list[tuple[str, str, bytes | str | None]] = [
        ("oci-layout", "file", b'{"imageLayoutVersion":"1.0.0"}'), ("index.json", "file", index),
        ("blobs", "dir", None), ("blobs/sha256", "dir", None)]
    archive += [(f"blobs/sha256/{d}", "file", data) for d, data in blobs.items()]
    path.write_bytes(_tar(archive))


@dataclass
class Containerd:
    root: Path
    address: str
    namespace: str

    def ctr(self, *args: str, input: bytes | None = None, timeout: float = 60,
            check: bool = False) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(["ctr", "--address", self.address, "-n", self.namespace, *args],
                              input=input if input is not None else b"", capture_output=True,
                              timeout=timeout, check=check)

    def run(self, id: str, *cmd: str, input: bytes | None = None,
            extra: tuple[str, ...] = ()) -> subprocess.CompletedProcess[bytes]:
        return self.ctr("run", "--rm", "--runtime", RUNTIME, *extra, IMAGE, id, *cmd,
                        input=input)


def _mounts_under(path: Path) -> list[str]:
    with open("/proc/self/mountinfo") as f:
        points = [line.split()[4] for line in f]
    return [p for p in points if p.startswith(str(path))]


@pytest.fixture(scope="module")
def containerd() -> Iterator[Containerd]:
    root = Path(tempfile.mkdtemp(prefix="shim-ctrd-", dir="/tmp"))
    address = str(root / "containerd.sock")
    (root / "config.toml").write_text(
        f'version = 2\nroot = "{root}/root"\nstate = "{root}/state"\n'
        'disabled_plugins = ["io.containerd.grpc.v1.cri"]\n'
        f'[grpc]\n  address = "{address}"\n[debug]\n  level = "debug"\n')
    env = dict(os.environ, PATH=f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}")
    log = open(root / "containerd.log", "wb")
    proc = subprocess.Popen(["containerd", "--config", str(root / "config.toml")], env=env,
                            stdout=log, stderr=log, start_new_session=True)
    cd = Containerd(root, address, f"shimtest-{uuid.uuid4().hex[:8]}")
    try:
        for _ in range(100):
            if os.path.exists(address) and cd.ctr("version").returncode == 0:
                break
            time.sleep(0.1)
        else:
            pytest.fail("containerd did not come up")
        write_image(root / "image.tar")
        cd.ctr("images", "import", str(root / "image.tar"), check=True)
        yield cd
    finally:
        _teardown(cd, proc)
        log.close()


def _teardown(cd: Containerd, proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        tasks = cd.ctr("tasks", "ls", "-q").stdout.decode().split()
        for task in tasks:
            cd.ctr("tasks", "kill", "-s", "SIGKILL", task)
        for task in tasks:
            cd.ctr("tasks", "delete", "-f", task)
        for c in cd.ctr("containers", "ls", "-q").stdout.decode().split():
            cd.ctr("containers", "rm", c)
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    for pid in shim_pids(cd.address):  # shims that outlived containerd are ours to end
        os.kill(pid, signal.SIGKILL)
    for point in sorted(_mounts_under(cd.root), key=len, reverse=True):
        subprocess.run(["umount", "-l", point], check=False)
    shutil.rmtree(f"/run/containerd/runc/{cd.namespace}", ignore_errors=True)
    remove_namespace_dirs([cd.namespace])  # the /<namespace> parent cgroups ctr run makes
    shutil.rmtree(cd.root, ignore_errors=True)


@pytest.fixture
def events(containerd: Containerd) -> Iterator[Path]:
    """``ctr events`` output (one event per line) collected during a test; only the
    /tasks/ topics, which are the ones the shim publishes, are looked at."""
    out = containerd.root / f"events-{uuid.uuid4().hex[:6]}.txt"
    with open(out, "wb") as f:
        proc = subprocess.Popen(["ctr", "--address", containerd.address, "events"], stdout=f,
                                stderr=subprocess.DEVNULL)
    time.sleep(0.3)
    try:
        yield out
    finally:
        proc.terminate()
        proc.wait(5)


def _topics(path: Path, namespace: str, id: str) -> list[str]:
    topics = []
    for line in path.read_text().splitlines():
        # "<date> <time> +0000 UTC <namespace> <topic> <json>"
        parts = line.split(" ", 6)
        if (len(parts) == 7 and parts[4] == namespace and parts[5].startswith("/tasks/")
                and f'"{id}"' in parts[6]):
            topics.append(parts[5])
    return topics


def _wait_for(predicate: object, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return True
        time.sleep(0.05)
    return False


def test_exit_status_is_reported(containerd: Containerd, events: Path) -> None:
    res = containerd.run("exit3", "sh", "-c", "exit 3")
    assert res.returncode == 3, res.stderr
    assert _wait_for(lambda: "/tasks/delete" in _topics(events, containerd.namespace, "exit3"))
    assert _topics(events, containerd.namespace, "exit3") == [
        "/tasks/create", "/tasks/start", "/tasks/exit", "/tasks/delete"]


def test_stdout_stderr_and_stdin(containerd: Containerd) -> None:
    res = containerd.run("outerr", "sh", "-c", "echo out; echo err >&2")
    assert res.returncode == 0 and res.stdout == b"out\n" and b"err\n" in res.stderr
    res = containerd.run("stdin", "cat", input=b"hi\n")
    assert res.returncode == 0 and res.stdout == b"hi\n"


@pytest.mark.skipif(shutil.which("script") is None, reason="needs script(1) for a pty")
def test_terminal(containerd: Containerd) -> None:
    cmd = (f"ctr --address {containerd.address} -n {containerd.namespace} run --rm -t "
           f"--runtime {RUNTIME} {IMAGE} tty1 sh -c 'tty; exit 7'")
    res = subprocess.run(["script", "-qec", cmd, "/dev/null"], capture_output=True, timeout=60,
                         stdin=subprocess.DEVNULL)
    assert res.returncode == 7, res.stdout + res.stderr
    assert b"/dev/pts/0" in res.stdout


def test_detached_task_lifecycle(containerd: Containerd, events: Path) -> None:
    ctr = containerd.ctr
    res = ctr("run", "-d", "--runtime", RUNTIME, IMAGE, "life", "sleep", "1000")
    assert res.returncode == 0, res.stderr
    try:
        assert b"RUNNING" in ctr("tasks", "ls").stdout
        res = ctr("tasks", "exec", "--exec-id", "e1", "life", "sh", "-c", "echo from-exec; exit 5")
        assert res.returncode == 5 and res.stdout == b"from-exec\n"
        res = ctr("tasks", "exec", "--exec-id", "e2", "life", "cat", input=b"piped\n")
        assert res.returncode == 0 and res.stdout == b"piped\n"
        ps = ctr("tasks", "ps", "life")
        assert ps.returncode == 0 and len(ps.stdout.splitlines()) == 2  # header + sleep
        assert ctr("tasks", "pause", "life").returncode == 0
        assert b"PAUSED" in ctr("tasks", "ls").stdout
        assert ctr("tasks", "resume", "life").returncode == 0
        assert b"RUNNING" in ctr("tasks", "ls").stdout
        metrics = ctr("tasks", "metrics", "life")
        assert metrics.returncode == 0 and b"pids.current" in metrics.stdout, metrics.stderr
        assert ctr("tasks", "kill", "-s", "SIGKILL", "life").returncode == 0
        assert _wait_for(lambda: b"STOPPED" in ctr("tasks", "ls").stdout)
        assert ctr("tasks", "delete", "life").returncode == 0
    finally:
        ctr("tasks", "kill", "-s", "SIGKILL", "life")
        ctr("tasks", "delete", "-f", "life")
        ctr("containers", "rm", "life")
    assert _wait_for(lambda: "/tasks/delete" in _topics(events, containerd.namespace, "life"))
    topics = _topics(events, containerd.namespace, "life")
    for topic in ("/tasks/create", "/tasks/start", "/tasks/exec-added", "/tasks/exec-started",
                  "/tasks/paused", "/tasks/resumed", "/tasks/exit", "/tasks/delete"):
        assert topic in topics
    assert topics.index("/tasks/start") < topics.index("/tasks/paused") < topics.index("/tasks/delete")
    assert _wait_for(lambda: not shim_pids(containerd.address))


def test_oom_is_reported(containerd: Containerd, events: Path) -> None:
    res = containerd.run("oom", "sh", "-c", "x=$(head -c 80000000 /dev/zero | tr '\\0' a); echo ${#x}",
                         extra=("--memory-limit", str(20 << 20)))
    assert res.returncode == 137
    assert _wait_for(lambda: "/tasks/delete" in _topics(events, containerd.namespace, "oom"))
    assert "/tasks/oom" in _topics(events, containerd.namespace, "oom")


def test_nothing_left_behind(containerd: Containerd) -> None:
    res = containerd.run("last", "true")
    assert res.returncode == 0
    assert _wait_for(lambda: not shim_pids(containerd.address))
    state = containerd.root / "state"
    assert not [m for m in _mounts_under(state)]
    assert not os.listdir(f"/run/containerd/runc/{containerd.namespace}")
