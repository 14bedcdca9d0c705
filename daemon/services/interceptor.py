"""The one place where core errors become gRPC statuses (plus logging and metrics).

Services raise :mod:`ctrd.errors` exceptions; every method handler is wrapped so that
a failure is logged once with the method and namespace bound, the call is counted,
and the RPC ends with the mapped status code.

The wrapping happens once, when a service registers its handlers, rather than per
call: an interceptor chain run on every call would build fresh method handlers each
time, a cost that shows on small RPCs such as the 32 KiB ``Content.Read`` calls
`ctr content get` makes by the thousand.
"""
from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Callable
from typing import Any

import structlog
from google.protobuf.descriptor import ServiceDescriptor

from ctrd.errors import CtrdError, to_code

from ..rpc import Server
from ..rpc.call import Call
from ..rpc.handlers import MethodHandler, service_handlers
from ..rpc.status import AbortError, StatusCode
from .context import NAMESPACE_KEY, metadata_value

log = structlog.get_logger()
_CODES = {c.value: c for c in StatusCode}


class ErrorInterceptor:
    """Wraps method handlers with error mapping, failure logging and metrics."""

    def __init__(self, metrics: Any | None = None) -> None:
        # metrics: an object with recorder(method) -> (ok(seconds), failed(code_name,
        # seconds)), or None.
        self._metrics = metrics

    def registrar(self, server: Server) -> Registrar:
        """What services register on instead of ``server``: it wraps their handlers."""
        return Registrar(server, self)

    def wrap_handler(self, method: str, handler: MethodHandler) -> MethodHandler:
        return handler.with_behaviour(self._wrap(method, handler.behaviour))

    def _wrap(self, method: str, behaviour: Callable) -> Callable:
        ok, failed = self._recorders(method)
        report = self._report

        if inspect.isasyncgenfunction(behaviour):
            async def stream(request: Any, context: Call):
                start = time.monotonic()
                code = "OK"
                try:
                    async for item in behaviour(request, context):
                        yield item
                except asyncio.CancelledError:
                    code = "CANCELLED"
                    raise
                except Exception as exc:  # noqa: BLE001 - mapped below
                    status, message = report(method, context, exc)
                    code = status.name
                    await context.abort(status, message)
                finally:
                    # Also when the client stopped reading: the generator is then closed.
                    if code == "OK":
                        ok(time.monotonic() - start)
                    else:
                        failed(code, time.monotonic() - start)
            return stream

        # Unary handlers, and streaming ones written against context.read()/write().
        async def call(request: Any, context: Call):
            start = time.monotonic()
            try:
                result = await behaviour(request, context)
            except asyncio.CancelledError:
                failed("CANCELLED", time.monotonic() - start)
                raise
            except Exception as exc:  # noqa: BLE001 - mapped below
                status, message = report(method, context, exc)
                failed(status.name, time.monotonic() - start)
                await context.abort(status, message)
            ok(time.monotonic() - start)
            return result
        return call

    def _recorders(self, method: str) -> tuple[Callable[[float], None],
                                               Callable[[str, float], None]]:
        if self._metrics is None:
            return (lambda seconds: None), (lambda code, seconds: None)
        return self._metrics.recorder(method)

    def _report(self, method: str, context: Call,
                exc: Exception) -> tuple[StatusCode, str]:
        if isinstance(exc, AbortError):
            raise exc  # the handler aborted on purpose; its status stands
        number, message = to_code(exc)
        status = _CODES.get(number, StatusCode.UNKNOWN)
        bound = log.bind(method=method, namespace=metadata_value(context, NAMESPACE_KEY),
                         code=status.name)
        if isinstance(exc, CtrdError):
            bound.info("request failed", error=message)
        else:
            bound.exception("request failed unexpectedly", error=message)
        return status, message


class Registrar:
    """Stands in for the server while services register: wraps each handler once."""

    def __init__(self, server: Server, interceptor: ErrorInterceptor) -> None:
        self._server = server
        self._interceptor = interceptor

    def add_service(self, descriptor: ServiceDescriptor, servicer: object) -> None:
        """Serve the methods ``servicer`` has of the protobuf service ``descriptor``."""
        service = descriptor.full_name
        self._server.add_registered_method_handlers(service, {
            name: self._interceptor.wrap_handler(f"/{service}/{name}", handler)
            for name, handler in service_handlers(descriptor, servicer).items()})
