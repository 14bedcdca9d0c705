"""The kube-apiserver stand-in, driven by the real kubectl 1.27-1.33.

The runtime behind it here is a fake: a CRI gRPC server that hands out URLs of a stub
streaming server of this module. The stub either refuses upgrades (to see what kubectl
sent), answers 101 and echoes raw bytes (to check the relay), or speaks just enough of
the ``v5.channel.k8s.io`` WebSocket protocol for a whole ``kubectl exec`` to succeed.
A last test asks a real ctrd, for the error path of its CRI Exec.
"""
from __future__ import annotations

import base64
import concurrent.futures
import hashlib
import json
import secrets
import socket
import struct
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import grpc
import pytest
from helpers.ctrd_proc import CtrdProcess
from helpers.kube_apiserver import KUBECTL_DIR, KUBECTL_VERSIONS, KubeApiServer

from ctrd.api.k8s.cri.runtime.v1 import api_pb2 as pb
from ctrd.api.k8s.cri.runtime.v1 import api_pb2_grpc as rpc

pytestmark = [pytest.mark.integration, pytest.mark.skipif(
    not (KUBECTL_DIR / "kubectl.1.29").exists(), reason="needs the gcloud SDK's kubectl")]

SPDY_ONLY = ("1.27", "1.28", "1.29")
WEBSOCKET_FIRST = ("1.30", "1.31", "1.32", "1.33")
WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

# Container ids the fake runtime fails with, and how.
FAILURES = {"missing": grpc.StatusCode.NOT_FOUND, "bad": grpc.StatusCode.INVALID_ARGUMENT,
            "unimpl": grpc.StatusCode.UNIMPLEMENTED, "boom": grpc.StatusCode.INTERNAL}


def _need(version: str) -> None:
    if not (KUBECTL_DIR / f"kubectl.{version}").exists():
        pytest.skip(f"kubectl {version} missing")


# -- the stub streaming server -----------------------------------------------------------


@dataclass
class Arrival:
    head: bytes
    request: pb.ExecRequest | pb.PortForwardRequest | None

    @property
    def request_line(self) -> str:
        return self.head.split(b"\r\n", 1)[0].decode()

    def headers(self) -> list[tuple[str, str]]:
        lines = self.head.decode("latin-1").split("\r\n")[1:]
        return [(k.strip().lower(), v.strip()) for k, v in
                (line.split(":", 1) for line in lines if line)]

    def header(self, name: str) -> list[str]:
        return [v for k, v in self.headers() if k == name.lower()]


@dataclass
class Stub:
    """A fake runtime: CRI Exec/PortForward hand out tokens for this streaming server."""
    mode: str = "refuse"  # refuse | echo | websocket
    arrivals: list[Arrival] = field(default_factory=list)
    tokens: dict[str, pb.ExecRequest | pb.PortForwardRequest] = field(default_factory=dict)
    port: int = 0

    def url_for(self, kind: str, request: pb.ExecRequest | pb.PortForwardRequest) -> str:
        token = secrets.token_urlsafe(8)
        self.tokens[token] = request
        return f"http://127.0.0.1:{self.port}/{kind}/{token}"

    def serve(self, listener: socket.socket) -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            threading.Thread(target=self._connection, args=(conn,), daemon=True).start()

    def _connection(self, conn: socket.socket) -> None:
        with conn:
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = conn.recv(4096)
                if not chunk:
                    return
                data += chunk
            head, rest = data.split(b"\r\n\r\n", 1)
            token = head.split(b" ", 2)[1].decode().rsplit("/", 1)[-1]
            arrival = Arrival(head, self.tokens.pop(token, None))
            self.arrivals.append(arrival)
            upgrade = arrival.header("upgrade")
            if self.mode == "echo":
                conn.sendall(b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\n"
                             b"Upgrade: " + upgrade[0].encode() + b"\r\n\r\n" + rest)
                while chunk := conn.recv(65536):
                    conn.sendall(chunk)
            elif self.mode == "websocket" and upgrade == ["websocket"]:
                _serve_v5(conn, arrival, rest)
            else:
                body = b"stub refuses " + arrival.request_line.encode()
                conn.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain\r\n"
                             b"Connection: close\r\nContent-Length: %d\r\n\r\n%s"
                             % (len(body), body))


class FakeRuntime(rpc.RuntimeServiceServicer):
    def __init__(self, stub: Stub) -> None:
        self.stub = stub

    def Exec(self, request: pb.ExecRequest, context) -> pb.ExecResponse:
        if request.container_id in FAILURES:
            context.abort(FAILURES[request.container_id], f"fake {request.container_id}")
        return pb.ExecResponse(url=self.stub.url_for("exec", request))

    def PortForward(self, request: pb.PortForwardRequest, context) -> pb.PortForwardResponse:
        return pb.PortForwardResponse(url=self.stub.url_for("portforward", request))


# -- just enough of WebSocket and v5.channel.k8s.io ----------------------------------------


def _ws_frame(opcode: int, payload: bytes) -> bytes:
    size = len(payload)
    if size < 126:
        head = struct.pack("!BB", 0x80 | opcode, size)
    elif size < 65536:
        head = struct.pack("!BBH", 0x80 | opcode, 126, size)
    else:
        head = struct.pack("!BBQ", 0x80 | opcode, 127, size)
    return head + payload


class _Reader:
    def __init__(self, conn: socket.socket, buffered: bytes) -> None:
        self.conn, self.buf = conn, buffered

    def exactly(self, n: int) -> bytes:
        while len(self.buf) < n:
            chunk = self.conn.recv(65536)
            if not chunk:
                raise EOFError
            self.buf += chunk
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def frame(self) -> tuple[int, bytes]:
        first, second = self.exactly(2)
        size = second & 0x7F
        if size == 126:
            size = struct.unpack("!H", self.exactly(2))[0]
        elif size == 127:
            size = struct.unpack("!Q", self.exactly(8))[0]
        mask = self.exactly(4) if second & 0x80 else b"\0\0\0\0"
        payload = bytes(b ^ mask[i % 4] for i, b in enumerate(self.exactly(size)))
        return first & 0x0F, payload


def _serve_v5(conn: socket.socket, arrival: Arrival, rest: bytes) -> None:
    """Run the fake command: ``cat`` echoes stdin to stdout, ``exit N`` ends with N."""
    key = arrival.header("sec-websocket-key")[0].encode()
    accept = base64.b64encode(hashlib.sha1(key + WS_GUID).digest())
    conn.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                 b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept +
                 b"\r\nSec-WebSocket-Protocol: v5.channel.k8s.io\r\n\r\n")
    cmd = list(arrival.request.cmd) if isinstance(arrival.request, pb.ExecRequest) else []
    reader = _Reader(conn, rest)
    if cmd[:1] == ["cat"]:
        while True:
            try:
                opcode, payload = reader.frame()
            except EOFError:
                return
            if opcode == 0x9:  # ping
                conn.sendall(_ws_frame(0xA, payload))
            elif opcode == 0x8:
                return
            elif payload[:1] == b"\x00" and len(payload) > 1:
                conn.sendall(_ws_frame(0x2, b"\x01" + payload[1:]))
            elif payload == b"\xff\x00":  # v5: the client closed stdin
                break
    code = int(cmd[1]) if cmd[:1] == ["exit"] else 0
    status: dict = {"metadata": {}, "status": "Success"}
    if code:
        status = {"metadata": {}, "status": "Failure", "reason": "NonZeroExitCode",
                  "message": f"command terminated with non-zero exit code: {code}",
                  "details": {"causes": [{"reason": "ExitCode", "message": str(code)}]}}
    conn.sendall(_ws_frame(0x2, b"\x03" + json.dumps(status).encode()))
    conn.sendall(_ws_frame(0x8, struct.pack("!H", 1000)))


# -- fixtures ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Stub, str]]:
    """The stub streaming server and the socket of the fake CRI runtime in front of it."""
    made = Stub()
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    made.port = listener.getsockname()[1]
    threading.Thread(target=made.serve, args=(listener,), daemon=True).start()
    address = f"unix://{tmp_path_factory.mktemp('cri')}/cri.sock"
    server = grpc.server(concurrent.futures.ThreadPoolExecutor(4))
    rpc.add_RuntimeServiceServicer_to_server(FakeRuntime(made), server)
    server.add_insecure_port(address)
    server.start()
    try:
        yield made, address
    finally:
        server.stop(0)
        listener.close()


@pytest.fixture
def api(stub: tuple[Stub, str]) -> Iterator[KubeApiServer]:
    fake, address = stub
    fake.mode = "refuse"
    fake.arrivals.clear()
    with KubeApiServer(address) as server:
        server.register_pod("default", "web", {"app": "cid-app"}, "sandbox-1")
        yield server


def _raw(server: KubeApiServer, head: str) -> socket.socket:
    conn = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    conn.sendall(head.encode())
    return conn


def _read_head(conn: socket.socket) -> tuple[bytes, bytes]:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(4096)
        assert chunk, f"closed before a full answer: {data!r}"
        data += chunk
    head, rest = data.split(b"\r\n\r\n", 1)
    return head, rest


def _read_exactly(conn: socket.socket, buffered: bytes, n: int) -> bytes:
    while len(buffered) < n:
        chunk = conn.recv(4096)
        assert chunk, f"closed after {buffered!r}"
        buffered += chunk
    return buffered


def _http(server: KubeApiServer, method: str, path: str) -> tuple[int, bytes]:
    conn = _raw(server, f"{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    with conn:
        head, rest = _read_head(conn)
        while chunk := conn.recv(4096):
            rest += chunk
    return int(head.split()[1]), rest


# -- discovery and pods --------------------------------------------------------------------


@pytest.mark.parametrize("version", KUBECTL_VERSIONS)
def test_kubectl_gets_a_registered_pod(api: KubeApiServer, version: str) -> None:
    _need(version)
    result = api.kubectl(version, "get", "pod", "web", "-n", "default", "-o", "json")
    assert result.returncode == 0, result.stderr.decode()
    pod = json.loads(result.stdout)
    assert pod["metadata"]["name"] == "web" and pod["status"]["phase"] == "Running"
    assert pod["spec"]["containers"][0]["name"] == "app"
    assert pod["status"]["containerStatuses"][0]["containerID"] == "containerd://cid-app"
    paths = [path.split("?")[0] for _, path, _ in api.log]
    assert "/api" in paths and "/api/v1" in paths
    assert ("GET", "/api/v1/namespaces/default/pods/web", 200) in api.log
    # kubectl kept its discovery cache in the server's workdir, not in a home of the host.
    assert any(api.cache_dir.rglob("serverresources.json"))


def test_unknown_pod_is_not_found(api: KubeApiServer) -> None:
    result = api.kubectl("1.29", "exec", "nope", "--", "true")
    assert result.returncode != 0
    assert b'pods "nope" not found' in result.stderr
    code, body = _http(api, "GET", "/api/v1/namespaces/other/pods/web")
    status = json.loads(body)
    assert code == 404 and status["kind"] == "Status" and status["reason"] == "NotFound"


def test_exec_arguments_are_checked(api: KubeApiServer) -> None:
    api.register_pod("default", "two", {"a": "cid-a", "b": "cid-b"}, "sandbox-2")
    base = "/api/v1/namespaces/default/pods"
    assert _http(api, "POST", f"{base}/web/exec?stdout=true")[0] == 400
    assert _http(api, "POST", f"{base}/web/exec?command=ls")[0] == 400  # no stream at all
    assert _http(api, "POST", f"{base}/web/exec?command=ls&stdout=true&container=x")[0] == 400
    assert _http(api, "POST", f"{base}/two/exec?command=ls&stdout=true")[0] == 400


# -- the relay -----------------------------------------------------------------------------


def test_upgrade_is_relayed_both_ways(api: KubeApiServer, stub: tuple[Stub, str]) -> None:
    fake, _ = stub
    fake.mode = "echo"
    path = ("/api/v1/namespaces/default/pods/web/exec?command=sh&command=-c&command=echo%20hi"
            "&container=app&stdin=true&stdout=true&stderr=true&tty=false")
    # The first payload rides in the same segment as the headers, as a pipelining client's
    # would: the relay must not lose what the HTTP parser read ahead.
    conn = _raw(api, f"POST {path} HTTP/1.1\r\nHost: api.example\r\nContent-Length: 0\r\n"
                     "Connection: Upgrade\r\nUpgrade: SPDY/3.1\r\n"
                     "X-Stream-Protocol-Version: v4.channel.k8s.io\r\n"
                     "X-Stream-Protocol-Version: channel.k8s.io\r\n\r\nearly")
    with conn:
        head, rest = _read_head(conn)
        assert head.startswith(b"HTTP/1.1 101 ")
        assert _read_exactly(conn, rest, 5) == b"early"
        for size in (1, 70_000):
            payload = secrets.token_bytes(size)
            conn.sendall(payload)
            assert _read_exactly(conn, b"", size) == payload
    arrival = fake.arrivals[-1]
    assert arrival.request_line.startswith("POST /exec/") and arrival.request_line.endswith(
        " HTTP/1.1")
    assert arrival.header("host") == [f"127.0.0.1:{fake.port}"]
    assert arrival.header("upgrade") == ["SPDY/3.1"]
    assert arrival.header("x-stream-protocol-version") == ["v4.channel.k8s.io",
                                                           "channel.k8s.io"]
    assert arrival.header("x-forwarded-for") == ["127.0.0.1"]
    assert arrival.request == pb.ExecRequest(container_id="cid-app", cmd=["sh", "-c", "echo hi"],
                                             stdin=True, stdout=True, stderr=True)
    _wait(lambda: any(status == 101 for *_, status in api.log))
    stream = api.streams[-1]
    assert stream.kind == "exec" and stream.upstream_status == 101


def test_tty_exec_asks_for_no_stderr(api: KubeApiServer, stub: tuple[Stub, str]) -> None:
    fake, _ = stub
    path = ("/api/v1/namespaces/default/pods/web/exec?command=sh&stdin=true&stdout=true"
            "&stderr=true&tty=true")
    code, body = _http(api, "GET", path)
    assert code == 400 and body.startswith(b"stub refuses GET /exec/")  # relayed as is
    assert fake.arrivals[-1].request == pb.ExecRequest(container_id="cid-app", cmd=["sh"],
                                                       tty=True, stdin=True, stdout=True)
    assert fake.arrivals[-1].request_line.startswith("GET /exec/")


@pytest.mark.parametrize(("container", "code"), [("missing", 404), ("bad", 400),
                                                 ("unimpl", 501), ("boom", 500)])
def test_cri_errors_become_statuses(api: KubeApiServer, container: str, code: int) -> None:
    api.register_pod("default", "failing", {"app": container}, "sandbox-3")
    got, body = _http(api, "POST", "/api/v1/namespaces/default/pods/failing/exec"
                                    "?command=ls&stdout=true")
    status = json.loads(body)
    assert got == code and status["code"] == code and status["status"] == "Failure"
    assert f"fake {container}" in status["message"]
    result = api.kubectl("1.29", "exec", "failing", "--", "ls")
    assert result.returncode != 0 and f"fake {container}".encode() in result.stderr


def test_stop_ends_live_relays(stub: tuple[Stub, str]) -> None:
    fake, address = stub
    fake.mode = "echo"
    server = KubeApiServer(address).start()
    workdir = server.workdir
    server.register_pod("default", "web", {"app": "cid-app"}, "sandbox-1")
    conn = _raw(server, "POST /api/v1/namespaces/default/pods/web/exec?command=sh&stdout=true "
                        "HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: SPDY/3.1\r\n\r\n")
    idle = _raw(server, "")  # a keep-alive connection that never sends a request
    with conn, idle:
        assert _read_head(conn)[0].startswith(b"HTTP/1.1 101 ")
        server.stop()
        assert conn.recv(10) == b"" and idle.recv(10) == b""
    assert not [t for t in threading.enumerate() if t.name.startswith("kube-apiserver")]
    assert not workdir.exists()


# -- the real kubectl ----------------------------------------------------------------------


@pytest.mark.parametrize("version", SPDY_ONLY)
def test_kubectl_spdy_exec_reaches_the_runtime(api: KubeApiServer, stub: tuple[Stub, str],
                                               version: str) -> None:
    _need(version)
    fake, _ = stub
    result = api.kubectl(version, "exec", "-i", "web", "--", "cat", input=b"")
    assert result.returncode != 0
    assert b"stub refuses POST /exec/" in result.stderr  # the runtime's answer, relayed
    [arrival] = fake.arrivals
    assert arrival.request == pb.ExecRequest(container_id="cid-app", cmd=["cat"], stdin=True,
                                             stdout=True, stderr=True)
    assert arrival.request_line.startswith("POST /exec/")
    assert arrival.header("upgrade") == ["SPDY/3.1"]
    assert arrival.header("connection") == ["Upgrade"]
    assert "v4.channel.k8s.io" in arrival.header("x-stream-protocol-version")
    assert arrival.header("kubectl-command") == ["kubectl exec"]


@pytest.mark.parametrize("version", WEBSOCKET_FIRST)
def test_kubectl_websocket_exec_round_trip(api: KubeApiServer, stub: tuple[Stub, str],
                                           version: str) -> None:
    _need(version)
    fake, _ = stub
    fake.mode = "websocket"
    data = b"hello through the relay\n" * 100
    result = api.kubectl(version, "exec", "-i", "web", "-c", "app", "--", "cat", input=data)
    assert result.returncode == 0, result.stderr.decode()
    assert result.stdout == data
    [arrival] = fake.arrivals
    assert arrival.request_line.startswith("GET /exec/")
    assert arrival.header("upgrade") == ["websocket"]
    assert arrival.header("sec-websocket-protocol") == ["v5.channel.k8s.io"]
    result = api.kubectl(version, "exec", "web", "--", "exit", "3")
    assert result.returncode == 3, result.stderr.decode()


def test_refused_websocket_falls_back_to_spdy(stub: tuple[Stub, str]) -> None:
    _need("1.32")
    fake, address = stub
    fake.mode = "refuse"
    fake.arrivals.clear()
    with KubeApiServer(address, websocket=False) as server:
        server.register_pod("default", "web", {"app": "cid-app"}, "sandbox-1")
        result = server.kubectl("1.32", "exec", "web", "--", "ls")
        assert b"stub refuses POST /exec/" in result.stderr
        exec_log = [(method, status) for method, path, status in server.log if "/exec" in path]
        assert exec_log == [("GET", 400), ("POST", 400)]
    # Only the SPDY attempt reached the runtime.
    assert [a.request_line.split()[0] for a in fake.arrivals] == ["POST"]


@pytest.mark.parametrize("version", ["1.29", "1.33"])
def test_kubectl_port_forward_reaches_the_runtime(api: KubeApiServer, stub: tuple[Stub, str],
                                                  version: str) -> None:
    _need(version)
    fake, _ = stub
    result = api.kubectl(version, "port-forward", "web", "0:80")
    assert result.returncode != 0 and b"stub refuses POST /portforward/" in result.stderr
    spdy = [a for a in fake.arrivals if a.request_line.startswith("POST")]
    assert spdy[-1].request == pb.PortForwardRequest(pod_sandbox_id="sandbox-1")
    assert spdy[-1].header("x-stream-protocol-version") == ["portforward.k8s.io"]
    if version >= "1.31":  # SPDY tunnelled in a WebSocket first
        first = fake.arrivals[0]
        assert first.request_line.startswith("GET /portforward/")
        assert first.header("sec-websocket-protocol") == ["SPDY/3.1+portforward.k8s.io"]
    _http(api, "GET", "/api/v1/namespaces/default/pods/web/portforward?ports=80,443")
    assert fake.arrivals[-1].request == pb.PortForwardRequest(pod_sandbox_id="sandbox-1",
                                                              port=[80, 443])


# -- a real ctrd ---------------------------------------------------------------------------


def test_ctrd_exec_errors_reach_kubectl(ctrd: CtrdProcess) -> None:
    with KubeApiServer(ctrd.address) as server:
        server.register_pod("default", "ghost", {"app": "no-such-container"}, "no-sandbox")
        result = server.kubectl("1.29", "exec", "ghost", "--", "ls")
        assert result.returncode != 0
        exec_log = [status for _, path, status in server.log if "/exec" in path]
        assert exec_log == [404], (server.log, result.stderr)
        result = server.kubectl("1.29", "port-forward", "ghost", "0:80")
        assert result.returncode != 0
        assert [s for _, p, s in server.log if "/portforward" in p] == [404]


def _wait(check, timeout: float = 5) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)

