"""The one place where core errors become gRPC statuses (plus logging and metrics).

Services raise :mod:`ctrd.errors` exceptions; this interceptor wraps every handler,
logs the failure once with the method and namespace bound, counts the call, and
aborts with the mapped status code.
"""
from __future__ import annotations

import inspect
import time
from collections.abc import Callable
from typing import Any

import grpc
import structlog
from grpc.aio import ServerInterceptor

from ctrd.errors import CtrdError, to_code

from .context import NAMESPACE_KEY, metadata_value

log = structlog.get_logger()
_CODES = {c.value[0]: c for c in grpc.StatusCode}


class ErrorInterceptor(ServerInterceptor):
    def __init__(self, metrics: Any | None = None) -> None:
        # metrics: an object with observe(method, code_name, seconds), or None.
        self._metrics = metrics

    async def intercept_service(self, continuation: Callable, details: grpc.HandlerCallDetails):
        handler = await continuation(details)
        if handler is None:
            return None
        method = details.method
        kinds = ("unary_unary", "unary_stream", "stream_unary", "stream_stream")
        for kind in kinds:
            behaviour = getattr(handler, kind)
            if behaviour is not None:
                wrapped = self._wrap(method, behaviour)
                factory = getattr(grpc, f"{kind}_rpc_method_handler")
                return factory(wrapped, request_deserializer=handler.request_deserializer,
                               response_serializer=handler.response_serializer)
        return handler

    def _wrap(self, method: str, behaviour: Callable) -> Callable:
        if inspect.isasyncgenfunction(behaviour):
            async def stream(request: Any, context: grpc.aio.ServicerContext):
                start = time.monotonic()
                code = "OK"
                try:
                    async for item in behaviour(request, context):
                        yield item
                except Exception as exc:  # noqa: BLE001 - mapped below
                    status, message = self._report(method, context, exc)
                    code = status.name
                    await context.abort(status, message)
                finally:
                    self._observe(method, code, start)
            return stream

        async def call(request: Any, context: grpc.aio.ServicerContext):
            start = time.monotonic()
            code = "OK"
            try:
                return await behaviour(request, context)
            except Exception as exc:  # noqa: BLE001 - mapped below
                status, message = self._report(method, context, exc)
                code = status.name
                await context.abort(status, message)
            finally:
                self._observe(method, code, start)
        return call

    def _report(self, method: str, context: grpc.aio.ServicerContext,
                exc: Exception) -> tuple[grpc.StatusCode, str]:
        if isinstance(exc, grpc.aio.AbortError):
            raise exc  # the handler aborted on purpose; its status stands
        number, message = to_code(exc)
        status = _CODES.get(number, grpc.StatusCode.UNKNOWN)
        bound = log.bind(method=method, namespace=metadata_value(context, NAMESPACE_KEY),
                         code=status.name)
        if isinstance(exc, CtrdError):
            bound.info("request failed", error=message)
        else:
            bound.exception("request failed unexpectedly", error=message)
        return status, message

    def _observe(self, method: str, code: str, start: float) -> None:
        if self._metrics is not None:
            self._metrics.observe(method, code, time.monotonic() - start)

