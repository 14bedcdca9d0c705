"""The gRPC channel to a daemon, and the per-call context every service area shares.

containerd's API scopes nearly every call to a namespace carried in request metadata,
and optionally to a lease; :class:`Connection` holds both so the service modules
stay free of plumbing. gRPC failures come back as :mod:`ctrd.errors` classes.
"""
from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, replace
from typing import Any, TypeVar

import grpc

from ctrd import errors

DEFAULT_ADDRESS = "/run/ctrd/ctrd.sock"
DEFAULT_NAMESPACE = "default"
NAMESPACE_KEY = "containerd-namespace"
LEASE_KEY = "containerd-lease"
# containerd's own limit; large enough for the biggest list and read responses.
MAX_MESSAGE = 16 << 20

T = TypeVar("T")


def target(address: str) -> str:
    """The gRPC target for a daemon address: a socket path, ``unix://`` URL or host:port."""
    if address.startswith("unix://"):
        return "unix:" + address[len("unix://"):]
    if address.startswith(("unix:", "dns:", "ipv4:", "ipv6:")):
        return address
    if address.startswith("/") or address.startswith("."):
        return "unix:" + address
    return address


def open_channel(address: str) -> grpc.aio.Channel:
    options = [
        ("grpc.max_receive_message_length", MAX_MESSAGE),
        ("grpc.max_send_message_length", MAX_MESSAGE),
        # A unix socket has no authority; gRPC would otherwise put the path there.
        ("grpc.default_authority", "localhost"),
    ]
    return grpc.aio.insecure_channel(target(address), options=options)


def translate(exc: grpc.aio.AioRpcError, address: str) -> errors.CtrdError:
    """The ctrd error for a failed call, with a message a person can act on."""
    code = exc.code()
    message = exc.details() or code.name.lower()
    if code == grpc.StatusCode.UNAVAILABLE:
        message = f"cannot reach daemon at {address}: {message}"
    elif code == grpc.StatusCode.DEADLINE_EXCEEDED and not exc.details():
        message = "deadline exceeded"
    return errors.from_code(code.value[0], message)


@dataclass(frozen=True)
class Connection:
    """A channel plus the namespace and lease calls are made in; cheap to copy."""

    channel: grpc.aio.Channel
    address: str
    namespace: str = DEFAULT_NAMESPACE
    lease: str | None = None
    timeout: float | None = None

    def with_namespace(self, namespace: str) -> Connection:
        return replace(self, namespace=namespace)

    def with_lease(self, lease: str | None) -> Connection:
        return replace(self, lease=lease)

    def metadata(self) -> tuple[tuple[str, str], ...]:
        meta = [(NAMESPACE_KEY, self.namespace)] if self.namespace else []
        if self.lease:
            meta.append((LEASE_KEY, self.lease))
        return tuple(meta)

    async def unary(self, method: Callable[..., Awaitable[T]], request: Any,
                    timeout: float | None = None) -> T:
        try:
            return await method(request, metadata=self.metadata(),
                                timeout=timeout if timeout is not None else self.timeout)
        except grpc.aio.AioRpcError as exc:
            raise translate(exc, self.address) from None

    async def stream(self, method: Callable[..., Any], request: Any,
                     timeout: float | None = None) -> AsyncIterator[Any]:
        """Messages of a server-streaming call, errors translated."""
        call = method(request, metadata=self.metadata(),
                      timeout=timeout if timeout is not None else self.timeout)
        try:
            async for message in call:
                yield message
        except grpc.aio.AioRpcError as exc:
            raise translate(exc, self.address) from None
        finally:
            call.cancel()
