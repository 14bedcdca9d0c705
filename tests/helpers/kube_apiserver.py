"""A stand-in for kube-apiserver and kubelet, so the real kubectl can reach CRI pods.

kubectl talks to :class:`KubeApiServer` as it would to an API server: it gets just
enough discovery to map ``pods`` and its subresources, and Pod objects made from the
CRI sandboxes and containers a test registers. For ``pods/exec``, ``pods/attach`` and
``pods/portforward`` the server does kubelet's part: it asks the runtime's CRI
``Exec``/``Attach``/``PortForward`` for a streaming URL, sends the client's request
there (same method and headers, the URL's path, Host rewritten) and then relays raw
bytes both ways, so the runtime's streaming server sees kubectl's own SPDY or WebSocket
upgrade.

Plain HTTP on 127.0.0.1 only; the server runs in its own threads, and ``stop`` closes
every connection it accepted or opened, so no thread outlives it.
"""
from __future__ import annotations

import http.server
import ipaddress
import json
import os
import secrets
import shutil
import socket
import subprocess
import tempfile
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

import grpc
import structlog

from ctrd.api.k8s.cri.runtime.v1 import api_pb2 as pb
from ctrd.api.k8s.cri.runtime.v1 import api_pb2_grpc as rpc

KUBECTL_DIR = Path("/usr/lib/google-cloud-sdk/bin")
KUBECTL_VERSIONS = ("1.27", "1.28", "1.29", "1.30", "1.31", "1.32", "1.33")

# What kube-apiserver answers for each gRPC failure of the runtime.
HTTP_FOR_GRPC = {
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.UNIMPLEMENTED: 501,
}
REASONS = {400: "BadRequest", 404: "NotFound", 405: "MethodNotAllowed",
           500: "InternalError", 501: "NotImplemented", 502: "BadGateway"}

# The resources of the core group kubectl needs to resolve "pod"/"pods"/"po" and know that
# exec, attach and portforward exist; verbs as the real server lists them.
_POD_RESOURCES = [
    {"name": "pods", "singularName": "pod", "namespaced": True, "kind": "Pod",
     "shortNames": ["po"], "categories": ["all"],
     "verbs": ["create", "delete", "deletecollection", "get", "list", "patch", "update",
               "watch"]},
    {"name": "pods/attach", "singularName": "", "namespaced": True, "kind": "PodAttachOptions",
     "verbs": ["create", "get"]},
    {"name": "pods/exec", "singularName": "", "namespaced": True, "kind": "PodExecOptions",
     "verbs": ["create", "get"]},
    {"name": "pods/portforward", "singularName": "", "namespaced": True,
     "kind": "PodPortForwardOptions", "verbs": ["create", "get"]},
    {"name": "pods/status", "singularName": "", "namespaced": True, "kind": "Pod",
     "verbs": ["get", "patch", "update"]},
    {"name": "namespaces", "singularName": "namespace", "namespaced": False,
     "kind": "Namespace", "shortNames": ["ns"], "verbs": ["get", "list"]},
]


@dataclass
class Pod:
    namespace: str
    name: str
    containers: dict[str, str]  # container name -> CRI container id
    sandbox_id: str
    image: str
    uid: str = field(default_factory=lambda: secrets.token_hex(16))
    created: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                               time.gmtime()))

    def manifest(self) -> dict:
        names = list(self.containers)
        return {
            "kind": "Pod", "apiVersion": "v1",
            "metadata": {"name": self.name, "namespace": self.namespace, "uid": self.uid,
                         "resourceVersion": "1", "creationTimestamp": self.created},
            "spec": {"containers": [{"name": n, "image": self.image} for n in names],
                     "nodeName": "ctrd", "restartPolicy": "Always"},
            "status": {
                "phase": "Running",
                "conditions": [{"type": t, "status": "True"} for t in
                               ("Initialized", "Ready", "ContainersReady", "PodScheduled")],
                "startTime": self.created,
                "containerStatuses": [
                    {"name": n, "ready": True, "started": True, "restartCount": 0,
                     "image": self.image, "imageID": "",
                     "containerID": f"containerd://{self.containers[n]}",
                     "state": {"running": {"startedAt": self.created}}}
                    for n in names],
            },
        }


@dataclass
class Stream:
    """One exec/portforward handed to the runtime: what was asked and where it went."""
    kind: str  # "exec" | "attach" | "portforward"
    namespace: str
    pod: str
    request: pb.ExecRequest | pb.AttachRequest | pb.PortForwardRequest
    url: str = ""
    forwarded: bytes = b""  # the request head sent to the streaming server
    upstream_status: int | None = None  # from the streaming server's first line


class ApiError(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def status_body(code: int, message: str) -> dict:
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": message, "reason": REASONS.get(code, "InternalError"), "code": code}


class KubeApiServer:
    """The API server and the kubelet of one fake node, for kubectl.

    ``cri_address`` is the runtime's socket (a path or ``unix://...``); the CRI channel
    opens on first use, so pods can be served before the runtime is up.
    ``websocket=False`` refuses WebSocket upgrades with 400 itself, so kubectl 1.30+
    falls back to SPDY without the runtime seeing the WebSocket attempt.
    """

    def __init__(self, cri_address: str, *, websocket: bool = True,
                 workdir: Path | None = None) -> None:
        self.cri_target = cri_address if "://" in cri_address else f"unix://{cri_address}"
        self.websocket = websocket
        self.log: list[tuple[str, str, int]] = []  # (method, path, status)
        self.streams: list[Stream] = []
        self._pods: dict[tuple[str, str], Pod] = {}
        self._lock = threading.Lock()
        self._sockets: set[socket.socket] = set()
        self._channel: grpc.Channel | None = None
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._given_workdir = workdir
        self._workdir: Path | None = workdir
        self.logger = structlog.get_logger().bind(component="kube-apiserver")

    # -- lifecycle ------------------------------------------------------------------------

    def start(self) -> Self:
        if self._workdir is None:
            self._workdir = Path(tempfile.mkdtemp(prefix="kube-apiserver-", dir="/tmp"))
        server = _Server(("127.0.0.1", 0), _handler_class(self))
        server.owner = self
        self._server = server
        self._write_kubeconfig()
        self._thread = threading.Thread(target=server.serve_forever, name="kube-apiserver",
                                        daemon=True)
        self._thread.start()
        self.logger.info("started", url=self.url)
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            # Idle keep-alive connections and relays block in recv; shutting their sockets
            # down wakes them so server_close can join every handler thread.
            with self._lock:
                sockets = list(self._sockets)
            for sock in sockets:
                _shutdown(sock)
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._channel is not None:
            self._channel.close()
            self._channel = None
        if self._given_workdir is None and self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        assert self._server is not None, "not started"
        return self._server.server_address[1]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def workdir(self) -> Path:
        """Holds the kubeconfig, kubectl's cache and HOME; made by start() unless given."""
        assert self._workdir is not None, "not started"
        return self._workdir

    @property
    def kubeconfig(self) -> Path:
        return self.workdir / "kubeconfig"

    @property
    def cache_dir(self) -> Path:
        return self.workdir / "cache"

    # -- pods -----------------------------------------------------------------------------

    def register_pod(self, namespace: str, name: str, containers: dict[str, str],
                     sandbox_id: str, image: str = "busybox") -> Pod:
        pod = Pod(namespace, name, dict(containers), sandbox_id, image)
        with self._lock:
            self._pods[(namespace, name)] = pod
        return pod

    def unregister_pod(self, namespace: str, name: str) -> None:
        with self._lock:
            self._pods.pop((namespace, name), None)

    def pod(self, namespace: str, name: str) -> Pod:
        with self._lock:
            pod = self._pods.get((namespace, name))
        if pod is None:
            raise ApiError(404, f'pods "{name}" not found')
        return pod

    def pods(self, namespace: str) -> list[Pod]:
        with self._lock:
            return [pod for (ns, _), pod in self._pods.items() if ns == namespace]

    # -- kubectl --------------------------------------------------------------------------

    def kubectl_argv(self, version: str, *args: str) -> list[str]:
        return [str(KUBECTL_DIR / f"kubectl.{version}"), "--kubeconfig", str(self.kubeconfig),
                "--cache-dir", str(self.cache_dir), *args]

    def kubectl_env(self) -> dict[str, str]:
        # HOME points into the workdir so nothing of the host's ~/.kube is read or written.
        home = self.workdir / "home"
        home.mkdir(exist_ok=True)
        return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(home)}

    def kubectl(self, version: str, *args: str, timeout: float = 60,
                input: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(self.kubectl_argv(version, *args), env=self.kubectl_env(),
                              input=input, capture_output=True, timeout=timeout, check=False)

    def _write_kubeconfig(self) -> None:
        config = {
            "apiVersion": "v1", "kind": "Config", "current-context": "ctrd",
            "clusters": [{"name": "ctrd", "cluster": {"server": self.url}}],
            "users": [{"name": "nobody", "user": {}}],
            "contexts": [{"name": "ctrd", "context": {"cluster": "ctrd", "user": "nobody",
                                                      "namespace": "default"}}],
        }
        # JSON is YAML, and kubectl reads either.
        self.kubeconfig.write_text(json.dumps(config, indent=1))

    # -- CRI ------------------------------------------------------------------------------

    def _runtime(self) -> rpc.RuntimeServiceStub:
        with self._lock:
            if self._channel is None:
                self._channel = grpc.insecure_channel(self.cri_target)
            return rpc.RuntimeServiceStub(self._channel)

    def stream_url(self, stream: Stream) -> str:
        """Ask the runtime where to send ``stream``; CRI failures become API errors."""
        with self._lock:
            self.streams.append(stream)
        runtime = self._runtime()
        try:
            if isinstance(stream.request, pb.ExecRequest):
                return runtime.Exec(stream.request, timeout=30).url
            if isinstance(stream.request, pb.AttachRequest):
                return runtime.Attach(stream.request, timeout=30).url
            return runtime.PortForward(stream.request, timeout=30).url
        except grpc.RpcError as err:
            code = HTTP_FOR_GRPC.get(err.code(), 500)
            raise ApiError(code, f"{stream.kind} failed: {err.code().name}: {err.details()}"
                           ) from err

    def record(self, method: str, path: str, status: int) -> None:
        with self._lock:
            self.log.append((method, path, status))

    def track(self, sock: socket.socket) -> None:
        with self._lock:
            self._sockets.add(sock)

    def untrack(self, sock: socket.socket) -> None:
        with self._lock:
            self._sockets.discard(sock)


class _Server(http.server.ThreadingHTTPServer):
    # Handler threads are joined on close: stop() must leave none behind.
    daemon_threads = False
    block_on_close = True
    owner: KubeApiServer

    def process_request(self, request: socket.socket, client_address) -> None:
        self.owner.track(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: socket.socket) -> None:
        self.owner.untrack(request)
        super().shutdown_request(request)


def _shutdown(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


def _handler_class(server: KubeApiServer) -> type[http.server.BaseHTTPRequestHandler]:
    class Handler(_Handler):
        owner = server
    return Handler


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    owner: KubeApiServer

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        self._dispatch()

    def do_POST(self) -> None:
        self._dispatch()

    def _dispatch(self) -> None:
        self._drain_body()
        url = urllib.parse.urlsplit(self.path)
        query = urllib.parse.parse_qs(url.query, keep_blank_values=True)
        parts = [urllib.parse.unquote(p) for p in url.path.strip("/").split("/")]
        try:
            self._route(parts, query)
        except ApiError as err:
            self._json(err.code, status_body(err.code, err.message))

    def _route(self, parts: list[str], query: dict[str, list[str]]) -> None:
        get = self.command == "GET"
        match parts:
            case ["version"] if get:
                self._json(200, {"major": "1", "minor": "32", "gitVersion": "v1.32.0-ctrd",
                                 "platform": "linux/amd64"})
            case ["api"] if get:
                self._json(200, {"kind": "APIVersions", "versions": ["v1"],
                                 "serverAddressByClientCIDRs": [
                                     {"clientCIDR": "0.0.0.0/0",
                                      "serverAddress": f"127.0.0.1:{self.owner.port}"}]})
            case ["apis"] if get:
                self._json(200, {"kind": "APIGroupList", "apiVersion": "v1", "groups": []})
            case ["api", "v1"] if get:
                self._json(200, {"kind": "APIResourceList", "apiVersion": "v1",
                                 "groupVersion": "v1", "resources": _POD_RESOURCES})
            case ["api", "v1", "namespaces", ns, "pods", name] if get:
                self._json(200, self.owner.pod(ns, name).manifest())
            case ["api", "v1", "namespaces", ns, "pods"] if get:
                self._json(200, {"kind": "PodList", "apiVersion": "v1",
                                 "metadata": {"resourceVersion": "1"},
                                 "items": [p.manifest() for p in self.owner.pods(ns)]})
            case ["api", "v1", "namespaces", ns, "pods", name, "exec"]:
                self._exec(self.owner.pod(ns, name), query)
            case ["api", "v1", "namespaces", ns, "pods", name, "portforward"]:
                self._portforward(self.owner.pod(ns, name), query)
            case ["api", "v1", "namespaces", ns, "pods", name, "attach"]:
                self._attach(self.owner.pod(ns, name), query)
            case ["api", "v1", "namespaces", ns, "pods", _, _]:
                raise ApiError(405, f"{self.command} is not served here")
            case _:
                raise ApiError(404, "the server could not find the requested resource")

    # -- exec and portforward -------------------------------------------------------------

    def _container(self, pod: Pod, query: dict[str, list[str]]) -> str:
        container = _last(query, "container")
        if not container:
            if len(pod.containers) != 1:
                raise ApiError(400, f"a container name must be specified for pod {pod.name}, "
                                    f"choose one of: {list(pod.containers)}")
            container = next(iter(pod.containers))
        if container not in pod.containers:
            raise ApiError(400, f"container {container} is not valid for pod {pod.name}")
        return container

    def _attach(self, pod: Pod, query: dict[str, list[str]]) -> None:
        tty = _flag(query, "tty")
        request = pb.AttachRequest(
            container_id=pod.containers[self._container(pod, query)], tty=tty,
            stdin=_flag(query, "stdin"), stdout=_flag(query, "stdout"),
            stderr=_flag(query, "stderr") and not tty)
        self._stream(Stream("attach", pod.namespace, pod.name, request))

    def _exec(self, pod: Pod, query: dict[str, list[str]]) -> None:
        command = query.get("command", [])
        if not command:
            raise ApiError(400, "you must specify at least 1 command")
        container = self._container(pod, query)
        tty = _flag(query, "tty")
        request = pb.ExecRequest(
            container_id=pod.containers[container], cmd=command, tty=tty,
            stdin=_flag(query, "stdin"), stdout=_flag(query, "stdout"),
            # kubelet never asks for stderr with a tty: the terminal carries both.
            stderr=_flag(query, "stderr") and not tty)
        if not (request.stdin or request.stdout or request.stderr):
            raise ApiError(400, "you must specify at least one of stdin, stdout, stderr")
        self._stream(Stream("exec", pod.namespace, pod.name, request))

    def _portforward(self, pod: Pod, query: dict[str, list[str]]) -> None:
        # SPDY clients name ports per stream; only WebSocket clients put them in the query.
        ports = []
        for value in query.get("ports", []) + query.get("port", []):
            for item in value.split(","):
                if not item.strip().isdigit():
                    raise ApiError(400, f"invalid port {item!r}")
                ports.append(int(item))
        request = pb.PortForwardRequest(pod_sandbox_id=pod.sandbox_id, port=ports)
        self._stream(Stream("portforward", pod.namespace, pod.name, request))

    def _stream(self, stream: Stream) -> None:
        if not self.owner.websocket and \
                self.headers.get("upgrade", "").lower() == "websocket":
            raise ApiError(400, "websocket upgrades are refused by this server")
        stream.url = self.owner.stream_url(stream)
        target = urllib.parse.urlsplit(stream.url)
        if target.scheme != "http" or not _loopback(target.hostname or ""):
            raise ApiError(500, f"streaming URL {stream.url} is not plain http on loopback")
        try:
            upstream = socket.create_connection((target.hostname, target.port or 80),
                                                timeout=10)
        except OSError as err:
            raise ApiError(502, f"dialing {stream.url}: {err}") from err
        upstream.settimeout(None)
        self.owner.track(upstream)
        try:
            stream.forwarded = self._request_head(target)
            upstream.sendall(stream.forwarded)
            self._stream_logger(stream).info("stream proxied", url=stream.url)
            self._relay(upstream, stream)
        finally:
            self.owner.untrack(upstream)
            upstream.close()
            self.close_connection = True

    def _request_head(self, target: urllib.parse.SplitResult) -> bytes:
        # kubelet's proxy sends the client's request to the streaming URL as is, but for the
        # target (path and query of the URL) and Host; it adds X-Forwarded-For.
        path = target.path or "/"
        if target.query:
            path += f"?{target.query}"
        lines = [f"{self.command} {path} HTTP/1.1", f"Host: {target.netloc}"]
        forwarded = [self.client_address[0]]
        for key, value in self.headers.items():
            lowered = key.lower()
            if lowered == "host":
                continue
            if lowered == "x-forwarded-for":
                forwarded.insert(0, value)
                continue
            lines.append(f"{key}: {value}")
        lines.append(f"X-Forwarded-For: {', '.join(forwarded)}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    def _relay(self, upstream: socket.socket, stream: Stream) -> None:
        client = self.connection
        done = threading.Event()

        def back() -> None:
            # Streaming server -> client, noting the status the upgrade got.
            head = b""
            try:
                while chunk := upstream.recv(65536):
                    if stream.upstream_status is None:
                        head += chunk
                        if b"\r\n" in head:
                            # 0: whatever came back was no HTTP status line.
                            stream.upstream_status = _status_of(head) or 0
                            self._record(stream.upstream_status)
                    client.sendall(chunk)
            except OSError:
                pass
            finally:
                done.set()
                _shutdown(client)
                _shutdown(upstream)

        thread = threading.Thread(target=back, name="kube-apiserver-relay", daemon=True)
        thread.start()
        try:
            # Client -> streaming server. rfile may hold bytes read past the headers, so it
            # is read rather than the socket.
            while not done.is_set() and (chunk := self.rfile.read1(65536)):
                upstream.sendall(chunk)
        except (OSError, ValueError):
            pass
        finally:
            # As kubelet's proxy: once either direction ends, both sides are closed.
            _shutdown(upstream)
            _shutdown(client)
            thread.join()
        if stream.upstream_status is None:
            self._record(0)

    def _stream_logger(self, stream: Stream) -> structlog.typing.FilteringBoundLogger:
        return self.owner.logger.bind(kind=stream.kind, namespace=stream.namespace,
                                      pod=stream.pod)

    # -- plumbing -------------------------------------------------------------------------

    def _drain_body(self) -> None:
        length = int(self.headers.get("content-length") or 0)
        if length:
            self.rfile.read(length)

    def _record(self, status: int) -> None:
        self.owner.record(self.command, self.path, status)

    def _json(self, code: int, body: dict) -> None:
        data = json.dumps(body).encode()
        # Logged before the answer goes out: a client may act on it first.
        self._record(code)
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


def _flag(query: dict[str, list[str]], name: str) -> bool:
    return _last(query, name).lower() in ("true", "1")


def _last(query: dict[str, list[str]], name: str) -> str:
    values = query.get(name)
    return values[-1] if values else ""


def _status_of(head: bytes) -> int | None:
    parts = head.split(b"\r\n", 1)[0].split()
    if len(parts) >= 2 and parts[0].startswith(b"HTTP/") and parts[1].isdigit():
        return int(parts[1])
    return None


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def kubectl_available(versions: tuple[str, ...] = KUBECTL_VERSIONS) -> bool:
    return all((KUBECTL_DIR / f"kubectl.{v}").exists() for v in versions)

