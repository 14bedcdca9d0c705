"""The shim zygote: forked shims run real containers, outlive the zygote, and the
zygote refuses requests for anything but a bundle under its state folder.

Shims are driven directly over ttrpc with bundles made here (runc's default spec, a
busybox rootfs); a small ttrpc events endpoint stands in for the daemon. Teardown
kills by PID only the shims these tests spawned and deletes their runc containers.
"""
from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from google.protobuf import empty_pb2

from ctrd import errors
from ctrd.api.containerd.runc.options import oci_pb2
from ctrd.api.containerd.runtime.task.v2 import shim_pb2
from ctrd.api.containerd.services.ttrpc.events.v1 import events_pb2
from ctrd.shim.zygote import SpawnRequest, spawn_via_zygote
from ctrd.ttrpc.blocking import Client, Server
from tests.helpers.runtime_env import make_rootfs

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root"),
    pytest.mark.skipif(shutil.which("runc") is None, reason="needs runc"),
]

SHIM = str(Path(sys.executable).with_name("containerd-shim-ctrd-v2"))
TASK = "containerd.task.v2.Task"
DAEMON_ADDRESS = "/run/zygote-test-daemon.sock"  # only names the shims' sockets


class Env:
    def __init__(self, base: Path) -> None:
        self.base = base
        self.state = base / "state"
        self.state.mkdir()
        self.namespace = f"zyg{uuid.uuid4().hex[:8]}"
        self.zygote_sock = str(base / "zygote.sock")
        self.events_sock = str(base / "events.sock")
        self.rootfs = make_rootfs(base)
        self.topics: list[tuple[str, str]] = []  # (topic, event type), in arrival order
        self.shim_pids: list[int] = []
        self.addresses: list[str] = []
        self.clients: list[Client] = []
        self.zygote: subprocess.Popen[bytes] | None = None
        self._lock = threading.Lock()
        self.events = Server()
        self.events.register("containerd.services.events.ttrpc.v1.Events",
                             {"Forward": self._forward})
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(self.events_sock)
        listener.listen(16)
        self.events.serve_in_thread(listener)

    def _forward(self, ctx: object, payload: bytes) -> bytes:
        env = events_pb2.ForwardRequest.FromString(payload).envelope
        with self._lock:
            self.topics.append((env.topic, env.event.type_url))
        return empty_pb2.Empty().SerializeToString()

    def start_zygote(self) -> subprocess.Popen[bytes]:
        self.zygote = subprocess.Popen(
            [SHIM, "zygote", "-socket", self.zygote_sock, "-state", str(self.state)],
            stderr=open(self.base / "zygote.log", "wb"))
        assert wait_for(lambda: can_connect(self.zygote_sock), 30), self.zygote_log()
        return self.zygote

    def zygote_log(self) -> str:
        return (self.base / "zygote.log").read_text()

    def bundle(self, id: str, *args: str) -> Path:
        path = self.state / self.namespace / id
        path.mkdir(parents=True)
        subprocess.run(["runc", "spec", "--bundle", str(path)], check=True, capture_output=True)
        spec = json.loads((path / "config.json").read_text())
        spec["process"]["args"] = list(args) or ["sleep", "600"]
        spec["process"]["terminal"] = False
        spec["root"] = {"path": str(self.rootfs), "readonly": True}
        (path / "config.json").write_text(json.dumps(spec))
        return path

    def request(self, id: str, bundle: str | Path | None = None, **kw: object) -> SpawnRequest:
        return SpawnRequest(self.namespace, id,
                            str(bundle if bundle is not None else self.state / self.namespace / id),
                            DAEMON_ADDRESS, self.events_sock, **kw)  # type: ignore[arg-type]

    def spawn(self, request: SpawnRequest) -> str:
        address = asyncio.run(spawn_via_zygote(self.zygote_sock, request, timeout=30))
        self.addresses.append(address)
        return address

    def connect(self, address: str, id: str) -> tuple[Client, int]:
        client = Client.connect(address)
        self.clients.append(client)
        r = client.call(TASK, "Connect", shim_pb2.ConnectRequest(id=id), shim_pb2.ConnectResponse)
        self.shim_pids.append(r.shim_pid)
        return client, r.shim_pid

    def run_container(self, id: str) -> tuple[Client, int]:
        """A busybox ``sleep`` through a forked shim; runc is run through a wrapper that
        writes down the environment the shim gave it."""
        bundle = self.bundle(id)
        runc = self.base / f"runc-{id}"
        runc.write_text(f"#!/bin/sh\nenv > {self.base}/runc-env-{id}\n"
                        f"exec {shutil.which('runc')} \"$@\"\n")
        runc.chmod(0o755)
        request = self.request(id, env={"ZYGOTE_TEST": id, "PATH": os.environ["PATH"]})
        client, pid = self.connect(self.spawn(request), id)
        create = shim_pb2.CreateTaskRequest(id=id, bundle=str(bundle))
        create.options.type_url = "containerd.runc.v1.Options"
        create.options.value = oci_pb2.Options(binary_name=str(runc)).SerializeToString()
        client.call(TASK, "Create", create, shim_pb2.CreateTaskResponse, timeout=30)
        client.call(TASK, "Start", shim_pb2.StartRequest(id=id), shim_pb2.StartResponse,
                    timeout=30)
        return client, pid

    def close(self) -> None:
        for client in self.clients:
            client.close()
        for pid in self.shim_pids:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
        runc_root = Path("/run/containerd/runc") / self.namespace
        if runc_root.is_dir():
            for id in os.listdir(runc_root):
                subprocess.run(["runc", "--root", str(runc_root), "delete", "--force", id],
                               capture_output=True, check=False)
            shutil.rmtree(runc_root, ignore_errors=True)
        for address in self.addresses:
            try:
                os.unlink(address.removeprefix("unix://"))
            except OSError:
                pass
        if self.zygote is not None and self.zygote.poll() is None:
            self.zygote.kill()
            self.zygote.wait()
        self.events.shutdown()
        shutil.rmtree(self.base, ignore_errors=True)


def can_connect(path: str) -> bool:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(path)
        return True
    except OSError:
        return False
    finally:
        s.close()


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def wait_for(predicate: object, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return True
        time.sleep(0.05)
    return False


def stat_fields(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


@pytest.fixture
def env() -> Iterator[Env]:
    e = Env(Path(tempfile.mkdtemp(prefix="zygote-test-", dir="/tmp")))
    try:
        e.start_zygote()
        yield e
    finally:
        e.close()


def test_forked_shims_run_containers_and_outlive_the_zygote(env: Env) -> None:
    assert env.zygote is not None
    zygote_pid = env.zygote.pid
    shims = {id: env.run_container(id) for id in ("one", "two")}
    for id, (client, pid) in shims.items():
        assert pid != zygote_pid
        fields = stat_fields(pid)
        assert int(fields[1]) != zygote_pid  # reparented away (double fork)
        assert int(fields[3]) == pid  # a session of its own
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        assert argv[:3] == [b"containerd-shim-ctrd-v2", b"-namespace", env.namespace.encode()]
        assert id.encode() in argv and DAEMON_ADDRESS.encode() in argv
        # The shim's environment (what runc is run with) is the one the request gave.
        runc_env = (env.base / f"runc-env-{id}").read_text().splitlines()
        assert f"ZYGOTE_TEST={id}" in runc_env
        assert f"TTRPC_ADDRESS={env.events_sock}" in runc_env
        assert Path(os.readlink(f"/proc/{pid}/cwd")) == env.state / env.namespace / id
        address = (env.state / env.namespace / id / "address").read_text()
        assert address == env.addresses[list(shims).index(id)]

    env.zygote.kill()
    env.zygote.wait()
    # No forked shim kept the zygote's listening socket: nobody accepts on it any more.
    assert not can_connect(env.zygote_sock)
    with pytest.raises(errors.Unavailable):
        env.spawn(env.request("three"))

    for id, (client, pid) in shims.items():
        assert alive(pid)
        state = client.call(TASK, "State", shim_pb2.StateRequest(id=id), shim_pb2.StateResponse)
        assert state.status == 2  # RUNNING
        client.call(TASK, "Kill", shim_pb2.KillRequest(id=id, signal=9), empty_pb2.Empty)
        waited = client.call(TASK, "Wait", shim_pb2.WaitRequest(id=id), shim_pb2.WaitResponse,
                             timeout=30)
        assert waited.exit_status == 137
        client.call(TASK, "Delete", shim_pb2.DeleteRequest(id=id), shim_pb2.DeleteResponse,
                    timeout=30)
        client.call(TASK, "Shutdown", shim_pb2.ShutdownRequest(id=id), empty_pb2.Empty)
        assert wait_for(lambda: not alive(pid))  # noqa: B023
    assert not (Path("/run/containerd/runc") / env.namespace / "one").exists()
    topics = [t for t, _ in env.topics]
    for topic in ("/tasks/create", "/tasks/start", "/tasks/exit", "/tasks/delete"):
        assert topics.count(topic) == 2, topics


def test_a_live_group_shim_is_reused(env: Env) -> None:
    """A second request for an address that is already served gets that address
    without a new fork, as ``start`` does for grouped containers."""
    env.bundle("grouped")
    address = env.spawn(env.request("grouped"))
    _, pid = env.connect(address, "grouped")
    assert env.spawn(env.request("grouped")) == address
    assert [p for p in env.shim_pids if alive(p)] == [pid]


def hostile(env: Env) -> list[tuple[str, SpawnRequest, type[errors.CtrdError]]]:
    outside = env.base / "outside" / env.namespace / "x"
    outside.mkdir(parents=True)
    (outside / "config.json").write_text("{}")
    env.bundle("mine")
    (env.state / env.namespace / "link").symlink_to(outside)
    ns_dir = env.state / env.namespace
    return [
        ("path in id", env.request("../x", ns_dir / "mine"), errors.InvalidArgument),
        ("empty id", env.request("", ns_dir / "mine"), errors.InvalidArgument),
        ("bad namespace", SpawnRequest("a/b", "mine", str(ns_dir / "mine"), DAEMON_ADDRESS),
         errors.InvalidArgument),
        ("no daemon address", SpawnRequest(env.namespace, "mine", str(ns_dir / "mine"), ""),
         errors.InvalidArgument),
        ("missing bundle", env.request("ghost"), errors.NotFound),
        ("relative bundle", env.request("mine", f"state/{env.namespace}/mine"),
         errors.InvalidArgument),
        ("dot-dot bundle", env.request("mine", f"{ns_dir}/../{env.namespace}/mine"),
         errors.InvalidArgument),
        ("bundle outside the state dir", env.request("x", outside), errors.PermissionDenied),
        ("symlink out of the state dir", env.request("link"), errors.PermissionDenied),
        ("another container's bundle", env.request("other", ns_dir / "mine"),
         errors.InvalidArgument),
        ("the state dir itself", env.request("mine", env.state), errors.PermissionDenied),
        ("env with =", env.request("mine", env={"A=B": "c"}), errors.InvalidArgument),
    ]


def test_hostile_requests_are_refused(env: Env) -> None:
    for name, request, error in hostile(env):
        with pytest.raises(error) as info:
            env.spawn(request)
        assert str(info.value), name
    assert not [p for p in env.shim_pids if alive(p)]
    assert not list(env.state.rglob("address"))
    # Not JSON, and a JSON value that is not an object: answered, not crashed on.
    for line in (b"garbage\n", b"[1, 2]\n", b'{"id": 5}\n'):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(10)
            s.connect(env.zygote_sock)
            s.sendall(line)
            reply = json.loads(s.makefile("rb").readline())
        assert reply["code"] == errors.InvalidArgument.code, reply
    # Still serving after all that.
    assert env.zygote is not None and env.zygote.poll() is None
    address = env.spawn(env.request("mine"))
    env.connect(address, "mine")


def test_sigterm_stops_the_zygote_and_removes_its_socket(env: Env) -> None:
    assert env.zygote is not None
    env.zygote.send_signal(signal.SIGTERM)
    assert env.zygote.wait(10) == 0
    assert not os.path.exists(env.zygote_sock)


def test_the_zygote_ends_with_its_parent(env: Env) -> None:
    """A zygote whose daemon died goes away (and frees its socket path for the next
    daemon's); the shims it forked stay."""
    env.bundle("kept")
    _, shim = env.connect(env.spawn(env.request("kept")), "kept")
    sock = str(env.base / "orphan.sock")
    parent = subprocess.Popen([sys.executable, "-c", (
        "import subprocess, sys, time\n"
        f"p = subprocess.Popen([{SHIM!r}, 'zygote', '-socket', {sock!r}, '-state', "
        f"{str(env.state)!r}], stderr=subprocess.DEVNULL)\n"
        "print(p.pid, flush=True)\n"
        "time.sleep(600)\n")], stdout=subprocess.PIPE)
    assert parent.stdout is not None
    zygote = int(parent.stdout.readline())
    try:
        assert wait_for(lambda: can_connect(sock), 30)
        parent.kill()
        parent.wait()
        assert wait_for(lambda: not alive(zygote), 10)
        assert not os.path.exists(sock)
        assert alive(shim)
    finally:
        if alive(zygote):
            os.kill(zygote, signal.SIGKILL)
        if parent.poll() is None:
            parent.kill()
            parent.wait()


def test_a_zygote_whose_daemon_already_died_exits(env: Env) -> None:
    """The daemon names itself with -parent: a zygote that finds another parent (the
    daemon was killed while the interpreter started, before the zygote could ask to be
    told of its death) leaves at once instead of waiting forever, socket unbound."""
    sock = env.base / "late.sock"
    proc = subprocess.run([SHIM, "zygote", "-socket", str(sock), "-state", str(env.state),
                           "-parent", "1"], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert "zygote_parent_gone" in proc.stderr
    assert not sock.exists()
    bad = subprocess.run([SHIM, "zygote", "-socket", str(sock), "-state", str(env.state),
                          "-parent", "x"], capture_output=True, text=True, timeout=30)
    assert bad.returncode == 2 and "-parent" in bad.stderr
