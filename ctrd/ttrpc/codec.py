"""The ttrpc envelope (Request/Response messages) and the service registry.

Everything here is shared by the asyncio and the blocking flavours: turning frames
into calls, finding the handler, turning results and exceptions into responses, and
turning a response back into a result or a ``ctrd.errors`` exception on the client.
"""
from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from google.protobuf.message import DecodeError, Message

from ctrd import errors
from ctrd.api.ttrpc import ttrpc_pb2
from ctrd.ttrpc import framing

NAMESPACE_KEY = "containerd-namespace"

M = TypeVar("M", bound=Message)
# A handler gets the call context and the raw request payload and returns the raw
# response payload; the asyncio server also accepts coroutines returning bytes.
Handler = Callable[["CallContext", bytes], "bytes | Awaitable[bytes]"]
Metadata = Mapping[str, "str | list[str]"]


class ClosedError(errors.Unavailable):
    """The connection ended before the call was answered."""


@dataclass(slots=True)
class CallContext:
    service: str
    method: str
    # Keys as the peer sent them; lookups through get() ignore case, as in Go's ttrpc.
    metadata: dict[str, list[str]] = field(default_factory=dict)
    # Seconds the client allows (from timeout_nano), None when unbounded.
    timeout: float | None = None

    def get(self, key: str) -> str | None:
        key = key.lower()
        for k, values in self.metadata.items():
            if k.lower() == key and values:
                return values[0]
        return None

    @property
    def namespace(self) -> str | None:
        return self.get(NAMESPACE_KEY)


# --- client side -----------------------------------------------------------------


def encode_request(
    service: str,
    method: str,
    payload: bytes,
    timeout: float | None = None,
    metadata: Metadata | None = None,
) -> bytes:
    req = ttrpc_pb2.Request(service=service, method=method, payload=payload)
    if timeout is not None and timeout > 0:
        req.timeout_nano = int(timeout * 1e9)
    for key, value in (metadata or {}).items():
        for v in [value] if isinstance(value, str) else value:
            req.metadata.add(key=key, value=v)
    data = req.SerializeToString()
    if len(data) > framing.MAX_MESSAGE:
        raise oversize_error(len(data))  # the peer would refuse it anyway
    return data


def decode_response(data: bytes) -> bytes:
    """The payload of a response, or the ``ctrd.errors`` exception its status stands for."""
    try:
        resp = ttrpc_pb2.Response.FromString(data)
    except DecodeError as exc:
        raise errors.Internal(f"ttrpc: malformed response: {exc}") from None
    if resp.HasField("status") and resp.status.code != 0:
        raise errors.from_code(resp.status.code, resp.status.message)
    return resp.payload


def decode_response_frame(frame: framing.Frame) -> bytes:
    """``decode_response`` for a frame read by a client, failing the call if the frame
    was too large to read or is not a response."""
    if frame.payload is None:
        raise oversize_error(frame.length)
    if frame.type != framing.TYPE_RESPONSE:
        raise errors.Internal("ttrpc: unknown message type received")
    return decode_response(frame.payload)


def oversize_error(length: int) -> errors.CtrdError:
    return errors.ResourceExhausted(
        f"message length {length} exceeds maximum message size of 4194304"
    )


# --- server side -----------------------------------------------------------------


def screen_request(frame: framing.Frame) -> bytes | None:
    """None for a frame that is a call to serve; otherwise what to answer instead: an
    error response, or ``b""`` for a frame to drop without an answer."""
    if frame.payload is None:
        return encode_error(errors.ResourceExhausted.code, str(oversize_error(frame.length)))
    if frame.type != framing.TYPE_REQUEST:
        return b""  # unknown kinds are ignored for forward compatibility
    if frame.stream_id % 2 != 1:
        return encode_error(
            errors.InvalidArgument.code, "StreamID must be odd for client initiated streams"
        )
    return None


def decode_request(data: bytes) -> tuple[CallContext, bytes]:
    try:
        req = ttrpc_pb2.Request.FromString(data)
    except DecodeError as exc:
        raise errors.InvalidArgument(f"unmarshal request error: {exc}") from None
    md: dict[str, list[str]] = {}
    for kv in req.metadata:
        md.setdefault(kv.key, []).append(kv.value)
    timeout = req.timeout_nano / 1e9 if req.timeout_nano > 0 else None
    return CallContext(req.service, req.method, md, timeout), req.payload


def encode_response(payload: bytes = b"", exc: BaseException | None = None) -> bytes:
    resp = ttrpc_pb2.Response()
    if exc is not None:
        code, message = errors.to_code(exc)
        resp.status.code = code
        resp.status.message = message
    else:
        resp.payload = payload
    return resp.SerializeToString()


def encode_error(code: int, message: str) -> bytes:
    resp = ttrpc_pb2.Response()
    resp.status.code = code
    resp.status.message = message
    return resp.SerializeToString()


def result_response(ctx: CallContext, result: object) -> bytes:
    """The response for what a handler returned (once awaited, for a coroutine)."""
    if not isinstance(result, bytes):
        raise errors.Internal(f"ttrpc: handler for {ctx.method} returned no bytes")
    return encode_response(result)


def response_frame(stream_id: int, data: bytes) -> bytes:
    """The frame carrying a response; one too large for the peer becomes an error."""
    if len(data) > framing.MAX_MESSAGE:
        data = encode_error(errors.ResourceExhausted.code, str(oversize_error(len(data))))
    return framing.encode(stream_id, framing.TYPE_RESPONSE, data)


class Registry:
    """service name -> method name -> handler."""

    def __init__(self) -> None:
        self._services: dict[str, dict[str, Handler]] = {}

    def register(self, service: str, methods: Mapping[str, Handler]) -> None:
        if service in self._services:
            raise errors.AlreadyExists(f"ttrpc service {service} already registered")
        self._services[service] = dict(methods)

    def register_impl(self, descriptor: Any, impl: object) -> None:
        """Serve ``impl``'s methods named after the RPCs of a protobuf ServiceDescriptor.

        RPCs that ``impl`` lacks stay unregistered, so callers get UNIMPLEMENTED.
        """
        self.register(descriptor.full_name, service_handlers(descriptor, impl))

    def resolve(self, service: str, method: str) -> Handler:
        methods = self._services.get(service)
        if methods is None:
            raise errors.Unimplemented(f"service {service}")
        handler = methods.get(method)
        if handler is None:
            raise errors.Unimplemented(f"method {method}")
        return handler

    def lookup(self, data: bytes) -> tuple[CallContext, Handler, bytes]:
        """Decode a request and find its handler: the context, handler and payload."""
        ctx, payload = decode_request(data)
        return ctx, self.resolve(ctx.service, ctx.method), payload


def typed(request_cls: type[M], fn: Callable[[CallContext, M], Any]) -> Handler:
    """Wrap ``fn(ctx, request_message) -> response_message`` as a bytes handler."""

    def parse(payload: bytes) -> M:
        try:
            return request_cls.FromString(payload)
        except DecodeError as exc:
            raise errors.InvalidArgument(f"ttrpc: error unmarshalling payload: {exc}") from None

    if inspect.iscoroutinefunction(fn):

        async def async_handler(ctx: CallContext, payload: bytes) -> bytes:
            return (await fn(ctx, parse(payload))).SerializeToString()

        return async_handler

    def handler(ctx: CallContext, payload: bytes) -> bytes:
        return fn(ctx, parse(payload)).SerializeToString()

    return handler


def service_handlers(descriptor: Any, impl: object) -> dict[str, Handler]:
    from google.protobuf.message_factory import GetMessageClass

    handlers: dict[str, Handler] = {}
    for method in descriptor.methods:
        fn = getattr(impl, method.name, None)
        if fn is not None:
            handlers[method.name] = typed(GetMessageClass(method.input_type), fn)
    return handlers
