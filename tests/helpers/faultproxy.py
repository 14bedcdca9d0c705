"""An HTTP proxy on 127.0.0.1 that sits before a registry and misbehaves on request.

Each :class:`Fault` matches requests by method and path substring and fires a given
number of times (or forever); requests no fault claims are forwarded unchanged.
Faults: reply with a status, redirect to itself forever, corrupt a body byte, drop
or reset the connection after some bytes, stall, serve an oversized manifest,
ignore Range.
"""
from __future__ import annotations

import http.client
import http.server
import socket
import struct
import threading
import time
from dataclasses import dataclass, field

from .registry import free_port

HOP_HEADERS = {"connection", "keep-alive", "transfer-encoding", "proxy-connection", "upgrade"}


@dataclass
class Fault:
    # status | redirect_loop | corrupt | truncate | reset | stall | big_manifest | ignore_range
    kind: str
    method: str = "GET"
    path: str = ""  # substring of the request path, e.g. "/blobs/sha256:..."
    times: int | None = 1  # None: forever
    status: int = 503
    headers: dict[str, str] = field(default_factory=dict)
    after: int = 0  # bytes of body to pass before truncate/reset
    delay: float = 0.0  # stall: seconds before answering
    hits: int = 0

    def matches(self, method: str, path: str) -> bool:
        return (self.method in ("*", method) and self.path in path
                and (self.times is None or self.hits < self.times))


class FaultProxy:
    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.faults: list[Fault] = []
        self.log: list[tuple[str, str, int]] = []  # (method, path, status)
        self.port = free_port()
        self._lock = threading.Lock()
        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def add(self, fault: Fault) -> Fault:
        self.faults.append(fault)
        return fault

    def clear(self) -> None:
        self.faults.clear()
        self.log.clear()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _claim(self, method: str, path: str) -> Fault | None:
        with self._lock:
            for fault in self.faults:
                if fault.matches(method, path):
                    fault.hits += 1
                    return fault
        return None

    def _handler(self) -> type[http.server.BaseHTTPRequestHandler]:
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def _body(self) -> bytes:
                length = int(self.headers.get("content-length") or 0)
                if self.headers.get("transfer-encoding", "").lower() == "chunked":
                    return self._read_chunked()
                return self.rfile.read(length) if length else b""

            def _read_chunked(self) -> bytes:
                out = bytearray()
                while True:
                    size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                    if size == 0:
                        self.rfile.readline()
                        return bytes(out)
                    out += self.rfile.read(size)
                    self.rfile.readline()

            def _simple(self, status: int, headers: dict[str, str], body: bytes = b"") -> None:
                # Logged before answering: a client may act on the answer (and a test
                # count the log) before this thread runs again.
                proxy.log.append((self.command, self.path, status))
                self.send_response(status)
                for key, value in headers.items():
                    self.send_header(key, value)
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def _handle(self) -> None:
                body = self._body()
                fault = proxy._claim(self.command, self.path)
                kind = fault.kind if fault else ""
                if kind == "status":
                    self._simple(fault.status, fault.headers,
                                 b'{"errors":[{"code":"UNKNOWN","message":"injected"}]}')
                    return
                if kind == "redirect_loop":
                    self._simple(307, {"location": self.path})
                    return
                if kind == "stall":
                    time.sleep(fault.delay)
                if kind == "big_manifest":
                    data = b'{"schemaVersion":2,"pad":"' + b"x" * (5 << 20) + b'"}'
                    self._simple(200, {"content-type":
                                       "application/vnd.oci.image.manifest.v1+json"}, data)
                    return
                headers = {k: v for k, v in self.headers.items()
                           if k.lower() not in HOP_HEADERS and k.lower() != "host"}
                if kind == "ignore_range":
                    headers = {k: v for k, v in headers.items() if k.lower() != "range"}
                upstream = http.client.HTTPConnection("127.0.0.1", proxy.upstream_port, timeout=60)
                try:
                    upstream.request(self.command, self.path, body=body or None,
                                     headers={**headers, "host": f"127.0.0.1:{proxy.port}"})
                    response = upstream.getresponse()
                    data = response.read()
                    self._relay(response, data, fault)
                finally:
                    upstream.close()

            def _relay(self, response: http.client.HTTPResponse, data: bytes,
                       fault: Fault | None) -> None:
                kind = fault.kind if fault else ""
                proxy.log.append((self.command, self.path, response.status))  # before answering
                self.send_response(response.status)
                for key, value in response.getheaders():
                    if key.lower() not in HOP_HEADERS and key.lower() != "content-length":
                        self.send_header(key, value)
                length = response.getheader("content-length")
                self.send_header("content-length", length if self.command == "HEAD" and length
                                 else str(len(data)))
                self.end_headers()
                if self.command == "HEAD":
                    return
                if kind == "corrupt" and data:
                    middle = len(data) // 2
                    data = data[:middle] + bytes([data[middle] ^ 0xFF]) + data[middle + 1:]
                if kind in ("truncate", "reset"):
                    self.wfile.write(data[:fault.after])
                    self.wfile.flush()
                    if kind == "reset":
                        # SO_LINGER 0: close() sends RST instead of FIN.
                        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                                   struct.pack("ii", 1, 0))
                    elif kind == "truncate":
                        self.connection.shutdown(socket.SHUT_RDWR)
                    self.close_connection = True
                    return
                self.wfile.write(data)

            do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = _handle

        return Handler
