"""What a request carries besides its message: namespace and lease, from metadata.

containerd clients send the namespace in the ``containerd-namespace`` metadata key
(gRPC and ttrpc alike) and an optional lease in ``containerd-lease``.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from ctrd import identifiers
from ctrd.errors import FailedPrecondition, InvalidArgument

if TYPE_CHECKING:
    from ..rpc.call import Call

NAMESPACE_KEY = "containerd-namespace"
LEASE_KEY = "containerd-lease"


def metadata_value(context: Call, key: str) -> str | None:
    for item in context.invocation_metadata() or ():
        if item.key == key:
            return item.value if isinstance(item.value, str) else item.value.decode()
    return None


def namespace(context: Call) -> str:
    """The request's namespace; containerd answers FailedPrecondition when it is absent."""
    name = metadata_value(context, NAMESPACE_KEY)
    if not name:
        raise FailedPrecondition("namespace is required")
    try:
        identifiers.validate(name)
    except InvalidArgument as exc:
        raise InvalidArgument(f"namespace validation: {exc}") from None
    return name


def lease(context: Call) -> str | None:
    return metadata_value(context, LEASE_KEY) or None
