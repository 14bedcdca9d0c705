"""Method handlers built from a service's protobuf descriptor.

A servicer is a plain object with one method per RPC, named as in the .proto and
called as grpcio calls them: ``(request, context)`` for a unary request,
``(request_iterator, context)`` for a streaming one; a streaming response is an
async generator or written with ``context.write``. RPCs the servicer lacks are left
out, so clients get UNIMPLEMENTED for them, as from any gRPC server.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from google.protobuf.descriptor import ServiceDescriptor
from google.protobuf.message_factory import GetMessageClass


@dataclass(frozen=True, slots=True)
class MethodHandler:
    """The fields grpcio's RpcMethodHandler has, so either kind can be served."""

    request_streaming: bool
    response_streaming: bool
    request_deserializer: Callable[[bytes], Any] | None
    response_serializer: Callable[[Any], bytes] | None
    unary_unary: Callable[..., Any] | None = None
    unary_stream: Callable[..., Any] | None = None
    stream_unary: Callable[..., Any] | None = None
    stream_stream: Callable[..., Any] | None = None

    @property
    def behaviour(self) -> Callable[..., Any]:
        return (self.unary_unary or self.unary_stream or self.stream_unary
                or self.stream_stream)  # type: ignore[return-value]

    def with_behaviour(self, behaviour: Callable[..., Any]) -> MethodHandler:
        return method_handler(self.request_streaming, self.response_streaming, behaviour,
                              self.request_deserializer, self.response_serializer)


def method_handler(request_streaming: bool, response_streaming: bool,
                   behaviour: Callable[..., Any],
                   deserializer: Callable[[bytes], Any] | None,
                   serializer: Callable[[Any], bytes] | None) -> MethodHandler:
    kind = (("stream" if request_streaming else "unary") + "_"
            + ("stream" if response_streaming else "unary"))
    return MethodHandler(request_streaming, response_streaming, deserializer, serializer,
                         **{kind: behaviour})


def service_handlers(descriptor: ServiceDescriptor, servicer: object) -> dict[str, MethodHandler]:
    """``{method name: handler}`` for the RPCs of ``descriptor`` that ``servicer`` has."""
    handlers = {}
    for method in descriptor.methods:
        behaviour = getattr(servicer, method.name, None)
        if behaviour is None:
            continue
        handlers[method.name] = method_handler(
            method.client_streaming, method.server_streaming, behaviour,
            GetMessageClass(method.input_type).FromString,
            GetMessageClass(method.output_type).SerializeToString)
    return handlers
