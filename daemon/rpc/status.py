"""gRPC status codes, and what a handler uses to end a call early.

The daemon serves gRPC without importing grpcio: its C core alone maps about 12 MiB
into the process, a cost every running container shares (see bench/README.md).
Handlers written for grpcio keep working: a ``grpc.StatusCode`` is accepted wherever
a code is, and messages are read and written through the same servicer context.
"""
from __future__ import annotations

import enum
from typing import Any


class StatusCode(enum.IntEnum):
    """The codes and numbers of grpc/status (doc/statuscodes.md)."""

    OK = 0
    CANCELLED = 1
    UNKNOWN = 2
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    ALREADY_EXISTS = 6
    PERMISSION_DENIED = 7
    RESOURCE_EXHAUSTED = 8
    FAILED_PRECONDITION = 9
    ABORTED = 10
    OUT_OF_RANGE = 11
    UNIMPLEMENTED = 12
    INTERNAL = 13
    UNAVAILABLE = 14
    DATA_LOSS = 15
    UNAUTHENTICATED = 16


def code_number(code: Any) -> int:
    """The wire number of ours or of a ``grpc.StatusCode`` (whose value is ``(n, name)``)."""
    value = code.value
    return value[0] if isinstance(value, tuple) else int(value)


class AbortError(Exception):
    """Raised by ``context.abort()``: the call ends with the status set there."""


class _EndOfStream:
    def __repr__(self) -> str:
        return "EOF"


# What ``context.read()`` returns once the client has ended its side of the stream.
EOF: Any = _EndOfStream()
