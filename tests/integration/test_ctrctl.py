"""ctrctl against a real ctrd (and some of it against the reference containerd).

Every error case checks for a clean one-line message, a non-zero exit and no traceback.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from ctrd.client import Client
from ctrd.oci import busybox, writer
from helpers.containerd_ref import containerd_ref  # noqa: F401  (fixture)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

CTRCTL = str(Path(sys.executable).parent / "ctrctl")
IMAGE = "ctrd.local/busybox:latest"


@dataclass
class Ctl:
    address: str
    fifo_dir: Path
    namespace: str = "default"

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(CTRD_ADDRESS=self.address, CTRD_NAMESPACE=self.namespace,
                   CTRCTL_FIFO_DIR=str(self.fifo_dir))
        return env

    def __call__(self, *args: str, input: str | None = None, check: bool = True,
                 timeout: float = 60) -> subprocess.CompletedProcess:
        r = subprocess.run([CTRCTL, *args], capture_output=True, text=True, env=self.env(),
                           input=input, timeout=timeout,
                           stdin=None if input is not None else subprocess.DEVNULL)
        assert "Traceback" not in r.stderr, r.stderr
        if check:
            assert r.returncode == 0, f"ctrctl {' '.join(args)}: {r.returncode}\n{r.stderr}"
        return r

    def fails(self, *args: str, message: str = "", code: int = 1,
              input: str | None = None) -> subprocess.CompletedProcess:
        r = self(*args, check=False, input=input)
        assert r.returncode == code, f"ctrctl {' '.join(args)}: {r.returncode}\n{r.stderr}"
        assert r.stderr.strip(), "an error must say something"
        assert message.lower() in r.stderr.lower(), r.stderr
        return r

    def json(self, *args: str):
        return json.loads(self(*args, "--format", "json").stdout)

    def cleanup(self) -> None:
        """Remove every container, so no shim or container outlives the daemon."""
        r = self("ps", "-aq", check=False, timeout=30)
        for cid in r.stdout.split():
            self("rm", "-f", cid, check=False, timeout=60)


def _ctl(address: str) -> Iterator[Ctl]:
    fifo_dir = Path(tempfile.mkdtemp(prefix="ctrctl-fifo-", dir="/tmp"))
    ctl = Ctl(address, fifo_dir)
    try:
        yield ctl
    finally:
        ctl.cleanup()
        shutil.rmtree(fifo_dir, ignore_errors=True)


@pytest.fixture
def ctl(ctrd) -> Iterator[Ctl]:
    yield from _ctl(ctrd.address)


@pytest.fixture
def ctl_image(ctl: Ctl) -> Ctl:
    assert f"Loaded image: {IMAGE}" in ctl("image", "build-default").stdout
    return ctl


# -- system ---------------------------------------------------------------------------


def test_version_info_namespaces(ctl: Ctl) -> None:
    assert "Server:" in ctl("version").stdout
    data = ctl.json("version")
    assert data["server"]["version"] and data["client"]["version"]
    info = ctl.json("info")
    assert any(p["type"] == "io.containerd.grpc.v1" for p in info["plugins"])
    assert info["namespace"] == "default"

    assert ctl("namespace", "create", "team-a", "--label", "owner=me").stdout.strip() == "team-a"
    assert {"name": "team-a", "labels": {"owner": "me"}} in ctl.json("namespace", "ls")
    assert "team-a" in ctl("namespace", "ls", "-q").stdout.split()
    ctl.fails("namespace", "create", "team-a", message="already exists")
    ctl.fails("namespace", "create", "bad name!", message="must match")
    ctl.fails("namespace", "create", "x", "--label", "=v", code=2)
    ctl.fails("namespace", "rm", "nosuch", message="nosuch")
    ctl("namespace", "rm", "team-a")
    assert "team-a" not in ctl("namespace", "ls", "-q").stdout.split()
    ctl.fails("--namespace", "bad name!", "ps", message="namespace")


def test_events_stream(ctl_image: Ctl) -> None:
    ctl = ctl_image
    proc = subprocess.Popen([CTRCTL, "events", "--format", "json"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=ctl.env())
    try:
        time.sleep(1.0)  # let the subscription start
        ctl("image", "tag", IMAGE, "ctrd.local/tagged:v1")
        deadline = time.monotonic() + 20
        event = None
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            event = json.loads(line)
            if event["topic"] == "/images/create":
                break
        assert event and event["topic"] == "/images/create", event
        assert event["payload"]["name"] == "ctrd.local/tagged:v1"
        assert event["namespace"] == "default"
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    assert "Traceback" not in proc.stderr.read()


# -- images ---------------------------------------------------------------------------


def test_images(ctl_image: Ctl, tmp_path: Path) -> None:
    ctl = ctl_image
    table = ctl("images").stdout
    assert table.splitlines()[0].split()[:2] == ["REPOSITORY", "TAG"]
    assert "ctrd.local/busybox" in table and "latest" in table
    listed = ctl.json("image", "ls")
    assert [i["name"] for i in listed] == [IMAGE] and listed[0]["size"] > 100_000

    assert ctl("image", "tag", "ctrd.local/busybox", "example.com/copy:1").stdout.strip() == \
        "example.com/copy:1"
    inspected = json.loads(ctl("image", "inspect", "example.com/copy:1").stdout)
    assert inspected[0]["config"]["rootfs"]["diff_ids"]
    assert inspected[0]["image"]["target"]["digest"] == listed[0]["digest"]
    assert set(ctl("images", "-q").stdout.split()) == {IMAGE, "example.com/copy:1"}

    ctl("image", "rm", "example.com/copy:1")
    ctl.fails("image", "rm", "example.com/copy:1", message="not found")
    ctl.fails("image", "inspect", "nosuch:tag", message="not found")
    ctl.fails("image", "tag", "nosuch", "x:y", message="not found")
    ctl.fails("images", "--format", "xml", code=2)

    # docker save and OCI archives, by path and on stdin.
    docker_tar, oci_tar = tmp_path / "d.tar", tmp_path / "o.tar"
    writer.write_docker_archive(docker_tar, {"docker.io/library/dock:v1":
                                             busybox.busybox_image(docker=True)})
    writer.write_oci_archive(oci_tar, {"example.com/oci:v2": busybox.busybox_image()})
    assert "Loaded image: docker.io/library/dock:v1" in ctl("load", "-i", str(docker_tar)).stdout
    assert "Loaded image: example.com/oci:v2" in ctl("import", str(oci_tar)).stdout
    r = subprocess.run([CTRCTL, "load", "--no-unpack"], stdin=open(oci_tar, "rb"),
                       capture_output=True, env=ctl.env(), timeout=60)
    assert r.returncode == 0 and b"example.com/oci:v2" in r.stdout, r.stderr
    assert "dock" in ctl("images").stdout

    garbage = tmp_path / "garbage.tar"
    garbage.write_bytes(os.urandom(4096))
    ctl.fails("import", str(garbage), message="not a readable tar")
    empty = tmp_path / "empty.tar"
    with __import__("tarfile").open(empty, "w"):
        pass
    ctl.fails("load", "-i", str(empty), message="neither an OCI archive")
    ctl.fails("import", str(tmp_path / "missing.tar"), message="no such file")

    # save, then load what was saved, to a file and through stdout.
    saved = tmp_path / "saved.tar"
    ctl("save", "-o", str(saved), "example.com/oci:v2")
    with __import__("tarfile").open(saved) as tar:
        assert {"index.json", "oci-layout"} <= set(tar.getnames())
    ctl("image", "rm", "example.com/oci:v2")
    assert "Loaded image: example.com/oci:v2" in ctl("load", "-i", str(saved)).stdout
    with open(tmp_path / "stdout.tar", "wb") as out:
        r = subprocess.run([CTRCTL, "image", "save", IMAGE, "example.com/oci:v2"], stdout=out,
                           stderr=subprocess.PIPE, env=ctl.env(), timeout=60)
    assert r.returncode == 0, r.stderr
    with __import__("tarfile").open(tmp_path / "stdout.tar") as tar:
        assert "index.json" in tar.getnames()
    ctl.fails("save", "-o", str(tmp_path / "x.tar"), "nosuch:tag", message="not found")
    assert not (tmp_path / "x.tar").exists()
    ctl.fails("save", "-o", str(tmp_path / "x.tar"), "Bad Name", message="invalid")
    ctl.fails("save", "-o", str(tmp_path / "no" / "dir.tar"), IMAGE, message="no such file")
    ctl.fails("save", code=2)


# -- containers -----------------------------------------------------------------------


def test_run_foreground(ctl_image: Ctl) -> None:
    ctl = ctl_image
    r = ctl("run", "--rm", "ctrd.local/busybox", "sh", "-c", "echo out; echo err >&2")
    assert r.stdout == "out\n" and r.stderr == "err\n"
    assert ctl("run", "--rm", IMAGE, "sh", "-c", "exit 7", check=False).returncode == 7
    assert ctl("run", "--rm", "-i", IMAGE, "tr", "a-z", "A-Z", input="shout\n").stdout == \
        "SHOUT\n"
    r = ctl("run", "--rm", "-e", "GREETING=hi", "-w", "/tmp", "-u", "nobody", IMAGE,
            "sh", "-c", "echo $GREETING; pwd; id -u; id -g")
    assert r.stdout.split() == ["hi", "/tmp", "65534", "65534"]
    r = ctl("run", "--rm", "--read-only", IMAGE, "sh", "-c", "touch /x", check=False)
    assert r.returncode != 0 and "Read-only" in r.stderr
    r = ctl("run", "--rm", "--memory", "48m", IMAGE, "sh", "-c",
            "cat /sys/fs/cgroup/memory.max 2>/dev/null "
            "|| cat /sys/fs/cgroup/memory/memory.limit_in_bytes")
    assert r.stdout.strip() == str(48 << 20)
    r = ctl("run", "--rm", "--net", "host", IMAGE, "hostname")
    assert r.stdout.strip() == os.uname().nodename
    assert ctl("ps", "-aq").stdout == ""  # --rm removed them all

    # Without --rm the container stays, with its exit status.
    assert ctl("run", "--name", "keep", IMAGE, "sh", "-c", "exit 3", check=False).returncode == 3
    ps = ctl.json("ps", "-a")
    assert [(c["id"], c["status"]) for c in ps] == [("keep", "Exited (3)")]
    assert ctl("ps", "-q").stdout == ""
    ctl.fails("run", "--name", "keep", IMAGE, "true", message="already exists")
    ctl("rm", "keep")


def test_run_errors(ctl_image: Ctl) -> None:
    ctl = ctl_image
    ctl.fails("run", "--rm", "nosuch/image:v9", "true", message="not found")
    ctl.fails("run", "--rm", "INVALID::ref", "true", message="invalid reference")
    ctl.fails("run", "--rm", "--name", "bad name!", IMAGE, "true", message="must match")
    ctl.fails("run", "--rm", "-u", "ghost", IMAGE, "true", message="no user 'ghost'")
    ctl.fails("run", "--rm", "-w", "relative", IMAGE, "true", message="absolute")
    r = ctl("run", "--rm", IMAGE, "/no/such/binary", check=False)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert ctl("ps", "-aq").stdout == ""  # nothing left behind by the failures


def test_detached_lifecycle(ctl_image: Ctl) -> None:
    ctl = ctl_image
    script = 'trap "echo bye; exit 0" TERM; echo started; while true; do sleep 0.1; done'
    assert ctl("run", "-d", "--name", "web", IMAGE, "sh", "-c", script).stdout.strip() == "web"
    ps = ctl.json("ps")
    assert [(c["id"], c["status"]) for c in ps] == [("web", "Up")] and ps[0]["pid"] > 0
    assert "web" in ctl("ps").stdout

    assert ctl("exec", "web", "sh", "-c", "echo inside; exit 4", check=False).returncode == 4
    assert ctl("exec", "-i", "web", "cat", input="via exec\n").stdout == "via exec\n"
    assert ctl("exec", "-e", "X=1", "-w", "/etc", "web", "sh", "-c", "echo $X; pwd"
               ).stdout.split() == ["1", "/etc"]
    inspected = json.loads(ctl("inspect", "web").stdout)[0]
    assert inspected["status"] == "Up" and inspected["task"]["status"] == "running"
    assert inspected["container"]["spec"]["process"]["args"][:2] == ["sh", "-c"]

    ctl.fails("rm", "web", message="stop it first")
    deadline = time.monotonic() + 10
    while "started" not in ctl("logs", "web").stdout and time.monotonic() < deadline:
        time.sleep(0.1)
    assert ctl("logs", "web").stdout == "started\n"
    assert ctl("stop", "-t", "5", "web").stdout.strip() == "web"
    assert ctl("logs", "web").stdout == "started\nbye\n"
    assert ctl("logs", "--tail", "1", "web").stdout == "bye\n"
    assert ctl.json("ps", "-a")[0]["status"] == "Exited (0)"
    ctl.fails("exec", "web", "true", message="not running")
    ctl.fails("kill", "web", message="not running")
    ctl("rm", "web")
    assert ctl("ps", "-aq").stdout == ""

    # A process that ignores SIGTERM is killed after the timeout; rm -f kills too.
    ctl("run", "-d", "--name", "stubborn", IMAGE, "sleep", "1000")
    ctl("run", "-d", "--name", "doomed", IMAGE, "sleep", "1000")
    started = time.monotonic()
    ctl("stop", "-t", "1", "stubborn")
    assert time.monotonic() - started < 15
    status = {c["id"]: c["status"] for c in ctl.json("ps", "-a")}
    assert status == {"stubborn": "Exited (137)", "doomed": "Up"}
    ctl("kill", "-s", "USR1", "doomed")  # sleep dies of SIGUSR1
    ctl("rm", "-f", "doomed", "stubborn")
    assert ctl("ps", "-aq").stdout == ""


@pytest.mark.parametrize("command", [
    ["stop", "ghost"], ["kill", "ghost"], ["rm", "ghost"], ["logs", "ghost"],
    ["inspect", "ghost"], ["exec", "ghost", "true"], ["rm", "-f", "ghost"],
])
def test_nonexistent_container(ctl: Ctl, command: list[str]) -> None:
    ctl.fails(*command, message="not found")


def test_logs_need_detached_container(ctl_image: Ctl) -> None:
    ctl = ctl_image
    ctl("run", "--name", "fg", IMAGE, "true")
    ctl.fails("logs", "fg", message="no log file")


@pytest.mark.skipif(shutil.which("script") is None, reason="needs script(1) for a terminal")
def test_tty(ctl_image: Ctl) -> None:
    ctl = ctl_image
    cmd = f"{CTRCTL} run --rm -t {IMAGE} sh -c 'tty; echo $TERM; exit 6'"
    r = subprocess.run(["script", "-qec", cmd, "/dev/null"], capture_output=True, text=True,
                       env=ctl.env(), timeout=60, stdin=subprocess.DEVNULL)
    assert r.returncode == 6, r
    assert "/dev/pts/" in r.stdout and "xterm" in r.stdout


# -- pull -----------------------------------------------------------------------------


def _has_transfer(address: str) -> bool:
    with Client(address) as client:
        return client.introspection.has_plugin("io.containerd.grpc.v1", "transfer")


@pytest.mark.skipif(shutil.which("docker-registry") is None or shutil.which("skopeo") is None,
                    reason="needs docker-registry and skopeo")
def test_pull(ctl: Ctl, ctrd, tmp_path: Path) -> None:
    if not _has_transfer(ctrd.address):
        pytest.skip("the daemon has no Transfer service (io.containerd.grpc.v1.transfer)")
    from helpers.registry import start_registry
    registry = start_registry(tmp_path / "registry")
    try:
        image = busybox.busybox_image(extra_layers=[[writer.file("etc/pulled", "yes\n")]])
        registry.push_image(image, "lib/bb:v1", tmp_path)
        ref = f"{registry.host}/lib/bb:v1"
        r = ctl("pull", "--plain-http", ref)
        assert r.stdout.strip() == ref
        assert [i["digest"] for i in ctl.json("images")] == [image.digest]
        assert ctl("run", "--rm", ref, "cat", "/etc/pulled").stdout == "yes\n"
        ctl.fails("pull", "--plain-http", f"{registry.host}/lib/missing:v1", message="not found")
    finally:
        registry.stop()


# -- the reference containerd -----------------------------------------------------------


@pytest.fixture
def ref_ctl(containerd_ref) -> Iterator[Ctl]:  # noqa: F811
    yield from _ctl(containerd_ref.address)


def test_against_containerd(ref_ctl: Ctl, containerd_ref) -> None:  # noqa: F811
    ctl = ref_ctl
    ctl("image", "build-default")
    assert ctl("run", "--rm", IMAGE, "echo", "from containerd").stdout == "from containerd\n"
    ctl("run", "-d", "--name", "bg", IMAGE, "sh", "-c", "echo logged; sleep 100")
    assert ctl("exec", "bg", "echo", "exec").stdout == "exec\n"
    ctl("stop", "-t", "1", "bg")
    assert ctl("logs", "bg").stdout == "logged\n"
    ctl("rm", "bg")
    ctl.fails("pull", "docker.io/library/busybox:latest", message="no Transfer service")
    # The library gives the same records as containerd's own client shows.
    with Client(containerd_ref.address) as client:
        assert [i.name for i in client.images.list()] == [IMAGE]
        assert IMAGE in containerd_ref.ctr("images", "ls", "-q").stdout
        assert client.containers.list() == []
        assert "default" in [n.name for n in client.namespaces.list()]
