"""CRI streaming: Exec and PortForward URLs, served over WebSocket and SPDY.

The WebSocket cases use a small client of the tests' own; the kubectl cases drive the
real kubectl binaries through a stand-in API server that proxies to the URL CRI hands
back, as kubelet does.
"""
from __future__ import annotations

import json
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from helpers.cri_env import BUSYBOX, CRI, code_of, cri_daemon
from helpers.kube_apiserver import KUBECTL_DIR, KubeApiServer
from helpers.registry import free_port
from helpers.wsclient import ChannelClient

from ctrd.api.k8s.cri.runtime.v1 import api_pb2 as pb

pytestmark = [pytest.mark.integration]

STDIN, STDOUT, STDERR, ERROR, RESIZE, CLOSE = 0, 1, 2, 3, 4, 255


@pytest.fixture(scope="module")
def cri() -> Iterator[CRI]:
    with cri_daemon() as env:
        yield env


@pytest.fixture(scope="module")
def pod(cri: CRI) -> Iterator[tuple[str, str]]:
    """A pod with one running busybox container: (pod id, container id)."""
    pod_id, config = cri.run_pod("streams")
    try:
        container = cri.container(pod_id, config, "shell", "sleep", "100000")
        cri.runtime.StartContainer(pb.StartContainerRequest(container_id=container),
                                   timeout=60)
        yield pod_id, container
    finally:
        cri.runtime.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=pod_id),
                                   timeout=60)
        cri.runtime.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=pod_id),
                                     timeout=60)


def _exec_url(cri: CRI, container: str, *cmd: str, **kw) -> str:
    kw.setdefault("stdout", True)
    return cri.runtime.Exec(pb.ExecRequest(container_id=container, cmd=list(cmd), **kw),
                            timeout=10).url


def test_exec_over_websocket(cri: CRI, pod: tuple[str, str]) -> None:
    _, container = pod
    url = _exec_url(cri, container, "sh", "-c", "echo out; echo err >&2; exit 3",
                    stderr=True)
    assert url.startswith("http://127.0.0.1:")
    client = ChannelClient(url)
    try:
        assert client.status == 101 and "v5.channel.k8s.io" in client.head
        got = client.collect()
    finally:
        client.close()
    assert got[STDOUT] == b"out\n" and got[STDERR] == b"err\n"
    status = json.loads(got[ERROR])
    assert status["status"] == "Failure" and status["reason"] == "NonZeroExitCode"
    assert status["details"]["causes"] == [{"reason": "ExitCode", "message": "3"}]
    # The URL was good for one connection only.
    again = ChannelClient(url)
    assert again.status == 404
    again.close()


def test_exec_stdin_and_close_signal(cri: CRI, pod: tuple[str, str]) -> None:
    _, container = pod
    client = ChannelClient(_exec_url(cri, container, "sh", "-c", "cat; echo done",
                                     stdin=True))
    try:
        client.send(STDIN, b"hello ")
        client.send(STDIN, b"world\n" * 20000)  # more than a pipe holds
        client.send(CLOSE, bytes([STDIN]))  # v5: stdin ends, the connection stays
        got = client.collect()
    finally:
        client.close()
    assert got[STDOUT] == b"hello " + b"world\n" * 20000 + b"done\n"
    assert json.loads(got[ERROR]) == {"metadata": {}, "status": "Success"}


def test_exec_tty_and_resize(cri: CRI, pod: tuple[str, str]) -> None:
    _, container = pod
    client = ChannelClient(_exec_url(cri, container, "sh", "-c",
                                     "sleep 1; stty size; tty", stdin=True, tty=True))
    try:
        client.send(RESIZE, json.dumps({"Width": 123, "Height": 45}).encode())
        got = client.collect()
    finally:
        client.close()
    lines = got[STDOUT].replace(b"\r", b"").split(b"\n")
    assert lines[0] == b"45 123" and lines[1].startswith(b"/dev/pts/")
    assert STDERR not in got  # a terminal merges both
    assert json.loads(got[ERROR])["status"] == "Success"


def test_client_leaving_kills_the_command(cri: CRI, pod: tuple[str, str]) -> None:
    _, container = pod
    client = ChannelClient(_exec_url(cri, container, "sh", "-c",
                                     "echo started; exec sleep 1000"))
    assert client.recv() == (STDOUT, b"started\n")
    client.close()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        out = cri.runtime.ExecSync(pb.ExecSyncRequest(container_id=container,
                                                      cmd=["ps", "-o", "args"]), timeout=30)
        if b"sleep 1000\n" not in out.stdout:
            break
        time.sleep(0.1)
    assert b"sleep 1000\n" not in out.stdout


def test_hostile_exec_requests(cri: CRI, pod: tuple[str, str]) -> None:
    pod_id, container = pod
    rt = cri.runtime
    assert code_of(rt.Exec, pb.ExecRequest(container_id=container, cmd=[], stdout=True),
                   timeout=10) == grpc.StatusCode.INVALID_ARGUMENT
    assert code_of(rt.Exec, pb.ExecRequest(container_id=container, cmd=["true"]),
                   timeout=10) == grpc.StatusCode.INVALID_ARGUMENT
    assert code_of(rt.Exec, pb.ExecRequest(container_id=container, cmd=["true"], tty=True,
                                           stdout=True, stderr=True),
                   timeout=10) == grpc.StatusCode.INVALID_ARGUMENT
    assert code_of(rt.Exec, pb.ExecRequest(container_id="0" * 64, cmd=["true"], stdout=True),
                   timeout=10) == grpc.StatusCode.NOT_FOUND
    assert code_of(rt.PortForward, pb.PortForwardRequest(pod_sandbox_id=pod_id, port=[0]),
                   timeout=10) == grpc.StatusCode.INVALID_ARGUMENT
    url = _exec_url(cri, container, "true")
    base = url.rsplit("/", 2)[0]
    for bad in (f"{base}/exec/not-a-token", f"{base}/nothing", f"{base}/exec/../portforward"):
        client = ChannelClient(bad)
        assert client.status == 404, bad
        client.close()
    # No upgrade offered, or a subprotocol the server does not speak.
    plain = ChannelClient(url, protocol="base64.channel.k8s.io")
    assert plain.status == 400
    plain.close()
    # The failed attempt used the token up: a new one works.
    client = ChannelClient(_exec_url(cri, container, "true"))
    assert json.loads(client.collect()[ERROR])["status"] == "Success"
    client.close()


def test_exec_of_a_missing_binary_reports_failure(cri: CRI, pod: tuple[str, str]) -> None:
    _, container = pod
    client = ChannelClient(_exec_url(cri, container, "/no/such/binary"))
    try:
        got = client.collect()
    finally:
        client.close()
    status = json.loads(got[ERROR])
    assert status["status"] == "Failure" and "no/such/binary" in status["message"]


# -- the real kubectl, through a stand-in API server that proxies as kubelet does ----------


@pytest.fixture(scope="module")
def kube(cri: CRI, pod: tuple[str, str]) -> Iterator[KubeApiServer]:
    if not (KUBECTL_DIR / "kubectl.1.29").exists():
        pytest.skip("needs the kubectl binaries of google-cloud-sdk")
    pod_id, container = pod
    with KubeApiServer(cri.daemon.address) as server:
        server.register_pod("default", "streams", {"shell": container}, pod_id)
        yield server


@pytest.mark.parametrize("version", ["1.29", "1.32"])  # SPDY, and WebSocket v5
def test_kubectl_exec(kube: KubeApiServer, version: str) -> None:
    done = kube.kubectl(version, "exec", "streams", "--", "sh", "-c",
                        "echo out; echo err >&2; exit 3")
    assert done.returncode == 3, done.stderr
    assert done.stdout == b"out\n" and b"err\n" in done.stderr
    piped = kube.kubectl(version, "exec", "-i", "streams", "--", "sh", "-c", "tr a-z A-Z",
                         input=b"shout " * 30000)
    assert piped.returncode == 0, piped.stderr
    assert piped.stdout == b"SHOUT " * 30000


def test_kubectl_exec_falls_back_to_spdy(cri: CRI, pod: tuple[str, str]) -> None:
    """What a real API server >= 1.30 does: it ends the client's WebSocket itself and
    speaks SPDY to kubelet, so the runtime sees SPDY from a new kubectl too."""
    pod_id, container = pod
    with KubeApiServer(cri.daemon.address, websocket=False) as server:
        server.register_pod("default", "streams", {"shell": container}, pod_id)
        done = server.kubectl("1.33", "exec", "streams", "--", "echo", "via spdy")
        assert (done.returncode, done.stdout) == (0, b"via spdy\n"), done.stderr
        assert [s.upstream_status for s in server.streams] == [101]


@pytest.mark.parametrize("version", ["1.29", "1.33"])
def test_kubectl_port_forward(cri: CRI, kube: KubeApiServer, pod: tuple[str, str],
                              version: str) -> None:
    _, container = pod
    # An echo server on the pod's loopback only: reachable through port forwarding alone.
    cri.runtime.ExecSync(pb.ExecSyncRequest(container_id=container, cmd=[
        "sh", "-c", "nc -ll -p 8080 -e /bin/cat </dev/null >/dev/null 2>&1 &"]), timeout=30)
    local = free_port()
    forward = subprocess.Popen(
        [*kube.kubectl_argv(version), "port-forward", "streams", f"{local}:8080"],
        env=kube.kubectl_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", local), timeout=5) as conn:
                    conn.sendall(b"ping through the pod\n")
                    assert conn.recv(100) == b"ping through the pod\n"
                    break
            except (ConnectionRefusedError, ConnectionResetError):
                time.sleep(0.2)
        else:
            raise AssertionError("port-forward never answered")
    finally:
        forward.terminate()
        forward.communicate(timeout=10)


def test_attach_to_a_container(cri: CRI, pod: tuple[str, str]) -> None:
    """kubectl attach: the container's own stdin and output; with stdin_once, the
    client closing stdin closes the container's, and its exit ends the session."""
    pod_id, _ = pod
    config = cri.runtime.PodSandboxStatus(pb.PodSandboxStatusRequest(pod_sandbox_id=pod_id),
                                          timeout=10).status
    assert config.state == pb.SANDBOX_READY
    created = cri.runtime.CreateContainer(pb.CreateContainerRequest(
        pod_sandbox_id=pod_id, config=pb.ContainerConfig(
            metadata=pb.ContainerMetadata(name="reader"), image=pb.ImageSpec(image=BUSYBOX),
            command=["sh", "-c", "while read line; do echo got $line; done; echo bye >&2"],
            stdin=True, stdin_once=True, log_path="reader.log")), timeout=60).container_id
    cri.runtime.StartContainer(pb.StartContainerRequest(container_id=created), timeout=60)
    url = cri.runtime.Attach(pb.AttachRequest(container_id=created, stdin=True, stdout=True,
                                              stderr=True), timeout=10).url
    client = ChannelClient(url)
    try:
        assert client.status == 101
        client.send(STDIN, b"one\n")
        assert client.recv() == (STDOUT, b"got one\n")
        client.send(STDIN, b"two\n")
        client.send(CLOSE, bytes([STDIN]))
        got = client.collect()
    finally:
        client.close()
    assert got[STDOUT] == b"got two\n" and got[STDERR] == b"bye\n"
    assert json.loads(got[ERROR])["status"] == "Success"
    assert cri.wait_exited(created).exit_code == 0
    # The same output went to the container's log too.
    log = cri.status(created).log_path
    assert "got one" in Path(log).read_text()
    rt = cri.runtime
    assert code_of(rt.Attach, pb.AttachRequest(container_id=created, stdout=True),
                   timeout=10) == grpc.StatusCode.FAILED_PRECONDITION
    _, running = pod
    assert code_of(rt.Attach, pb.AttachRequest(container_id=running, stdin=True, stdout=True),
                   timeout=10) == grpc.StatusCode.INVALID_ARGUMENT  # created without stdin
    assert code_of(rt.Attach, pb.AttachRequest(container_id=running, tty=True, stdout=True),
                   timeout=10) == grpc.StatusCode.INVALID_ARGUMENT  # not a tty container


def test_hostile_http_on_the_streaming_port(cri: CRI, pod: tuple[str, str]) -> None:
    _, container = pod
    url = _exec_url(cri, container, "true")
    host, port = url.split("/")[2].split(":")

    def ask(request: bytes) -> bytes:
        with socket.create_connection((host, int(port)), timeout=10) as conn:
            conn.sendall(request)
            chunks = []
            while chunk := conn.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks)

    path = url.split("/", 3)[3]
    assert ask(b"DELETE /" + path.encode() + b" HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.1 405")
    huge = b"GET /exec/x HTTP/1.1\r\nX-Junk: " + b"a" * 40000 + b"\r\n\r\n"
    assert ask(huge).startswith(b"HTTP/1.1 431")
    assert ask(b"\x16\x03\x01 not http at all\r\n\r\n").startswith(b"HTTP/1.1 405")
    # None of that used up the token: the URL still runs its command once.
    client = ChannelClient(url)
    assert json.loads(client.collect()[ERROR])["status"] == "Success"
    client.close()


@pytest.mark.parametrize("version", ["1.29", "1.32"])
def test_kubectl_attach(cri: CRI, kube: KubeApiServer, pod: tuple[str, str],
                        version: str) -> None:
    pod_id, _ = pod
    container = cri.runtime.CreateContainer(pb.CreateContainerRequest(
        pod_sandbox_id=pod_id, config=pb.ContainerConfig(
            metadata=pb.ContainerMetadata(name=f"attached-{version}"),
            image=pb.ImageSpec(image=BUSYBOX),
            command=["sh", "-c", "while read line; do echo got $line; done"],
            stdin=True, stdin_once=True)), timeout=60).container_id
    cri.runtime.StartContainer(pb.StartContainerRequest(container_id=container), timeout=60)
    kube.register_pod("default", f"attach-{version}", {"reader": container}, pod_id)
    done = kube.kubectl(version, "attach", "-i", f"attach-{version}",
                        input=b"one\ntwo\n")
    assert done.returncode == 0, done.stderr
    assert done.stdout == b"got one\ngot two\n"
    assert cri.wait_exited(container).exit_code == 0  # stdin_once: its stdin ended too
