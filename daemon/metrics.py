"""Prometheus metrics of the daemon, served on ``[metrics] address`` when set."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server

from ctrd.errors import InvalidArgument


class Metrics:
    def __init__(self) -> None:
        # A registry of our own rather than prometheus_client's process-wide default.
        self.registry = CollectorRegistry()
        self.requests = Counter("ctrd_grpc_requests", "gRPC requests handled",
                                ["method", "code"], registry=self.registry)
        self.latency = Histogram("ctrd_grpc_request_duration_seconds", "gRPC request latency",
                                 ["method"], registry=self.registry)
        self._server: Any = None

    def recorder(self, method: str) -> tuple[Callable[[float], None],
                                             Callable[[str, float], None]]:
        """(ok(seconds), failed(code, seconds)) for one method.

        The children of the OK series are looked up once, here: ``labels()`` takes a
        lock and builds a key per call, which adds up on RPCs that take a millisecond.
        """
        latency = self.latency.labels(method)
        ok_count = self.requests.labels(method, "OK")

        def ok(seconds: float) -> None:
            ok_count.inc()
            latency.observe(seconds)

        def failed(code: str, seconds: float) -> None:
            self.requests.labels(method, code).inc()
            latency.observe(seconds)

        return ok, failed

    def serve(self, address: str) -> None:
        host, sep, port = address.rpartition(":")
        if not sep or not port.isdigit():
            raise InvalidArgument(f"metrics address {address!r} is not host:port")
        result = start_http_server(int(port), addr=host.strip("[]") or "127.0.0.1",
                                   registry=self.registry)
        self._server = result[0] if isinstance(result, tuple) else None

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None
