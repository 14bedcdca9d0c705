"""The one error hierarchy of ctrd, and its mapping to gRPC status codes.

Core code (stores, snapshotters, runtime) raises these and knows nothing of gRPC or
ttrpc. The RPC layers turn them into status codes with :func:`to_code`, and turn
status codes received from peers back into them with :func:`from_code`, so a
NotFound from a shim is a NotFound in the daemon too. Codes are plain integers
(the gRPC numbering) so that the shim can use this module without importing grpc.
"""
from __future__ import annotations


class CtrdError(Exception):
    """Base class; ``code`` is the gRPC status code number."""

    code = 2  # UNKNOWN


class Canceled(CtrdError):
    code = 1


class Unknown(CtrdError):
    code = 2


class InvalidArgument(CtrdError):
    code = 3


class DeadlineExceeded(CtrdError):
    code = 4


class NotFound(CtrdError):
    code = 5


class AlreadyExists(CtrdError):
    code = 6


class PermissionDenied(CtrdError):
    code = 7


class ResourceExhausted(CtrdError):
    code = 8


class FailedPrecondition(CtrdError):
    code = 9


class Aborted(CtrdError):
    code = 10


class OutOfRange(CtrdError):
    code = 11


class Unimplemented(CtrdError):
    code = 12


class Internal(CtrdError):
    code = 13


class Unavailable(CtrdError):
    code = 14


class DataLoss(CtrdError):
    code = 15


class Unauthenticated(CtrdError):
    code = 16


_BY_CODE: dict[int, type[CtrdError]] = {
    cls.code: cls
    for cls in (
        Canceled, Unknown, InvalidArgument, DeadlineExceeded, NotFound, AlreadyExists,
        PermissionDenied, ResourceExhausted, FailedPrecondition, Aborted, OutOfRange,
        Unimplemented, Internal, Unavailable, DataLoss, Unauthenticated,
    )
}


def to_code(exc: BaseException) -> tuple[int, str]:
    """The (status code, message) a peer should see for ``exc``."""
    if isinstance(exc, CtrdError):
        return exc.code, str(exc)
    if isinstance(exc, TimeoutError):
        return DeadlineExceeded.code, str(exc) or "deadline exceeded"
    if isinstance(exc, NotImplementedError):
        return Unimplemented.code, str(exc) or "not implemented"
    return Unknown.code, f"{type(exc).__name__}: {exc}"


def from_code(code: int, message: str) -> CtrdError:
    """The exception that stands for a status received from a peer."""
    return _BY_CODE.get(code, Unknown)(message)
