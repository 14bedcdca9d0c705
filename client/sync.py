"""A blocking facade over :class:`AsyncClient` for scripts and tests.

    with Client("/run/ctrd/ctrd.sock") as client:
        print(client.version())
        for ns in client.namespaces.list():
            print(ns.name)

Every coroutine method of the async client and its service areas is a plain
method here; async iterators (events) become ordinary iterators. The client
owns a private event loop, so it must not be used from inside a running loop.
"""
from __future__ import annotations

import asyncio
import inspect
from collections.abc import AsyncIterator, Iterator
from typing import Any

from .client import AsyncClient
from .connection import DEFAULT_ADDRESS, DEFAULT_NAMESPACE


class _Blocking:
    """Wraps an object so that its coroutines run to completion on ``loop``."""

    def __init__(self, target: Any, loop: asyncio.AbstractEventLoop) -> None:
        self._target = target
        self._loop = loop

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._target, name)
        if inspect.iscoroutinefunction(value) or inspect.isasyncgenfunction(value):
            return self._wrap(value)
        if callable(value) and not isinstance(value, type):
            return self._wrap(value)
        if hasattr(value, "__dict__") and type(value).__module__.startswith("ctrd.client") \
                and not _is_record(value):
            return _Blocking(value, self._loop)
        return value

    def _wrap(self, function: Any) -> Any:
        def call(*args: Any, **kwargs: Any) -> Any:
            result = function(*args, **kwargs)
            if inspect.iscoroutine(result):
                return self._loop.run_until_complete(result)
            if isinstance(result, AsyncIterator):
                return _iterate(result, self._loop)
            if isinstance(result, AsyncClient):
                return _Blocking(result, self._loop)
            return result
        call.__name__ = getattr(function, "__name__", "call")
        call.__doc__ = getattr(function, "__doc__", None)
        return call


def _is_record(value: Any) -> bool:
    return hasattr(type(value), "__dataclass_fields__")


def _iterate(agen: AsyncIterator[Any], loop: asyncio.AbstractEventLoop) -> Iterator[Any]:
    try:
        while True:
            try:
                yield loop.run_until_complete(agen.__anext__())
            except StopAsyncIteration:
                return
    finally:
        aclose = getattr(agen, "aclose", None)
        if aclose is not None and not loop.is_closed():
            loop.run_until_complete(aclose())


class Client(_Blocking):
    def __init__(self, address: str = DEFAULT_ADDRESS, namespace: str = DEFAULT_NAMESPACE, *,
                 timeout: float | None = None) -> None:
        loop = asyncio.new_event_loop()

        async def make() -> AsyncClient:
            return AsyncClient(address, namespace, timeout=timeout)

        super().__init__(loop.run_until_complete(make()), loop)

    def with_namespace(self, namespace: str) -> _Blocking:
        return _Blocking(self._target.with_namespace(namespace), self._loop)

    def close(self) -> None:
        if not self._loop.is_closed():
            self._loop.run_until_complete(self._target.close())
            self._loop.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
