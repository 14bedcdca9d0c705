"""Client library for ctrd and containerd (same gRPC API): async and blocking.

    from ctrd.client import Client            # blocking
    from ctrd.client import AsyncClient       # asyncio

Errors are raised as :mod:`ctrd.errors` classes (NotFound, AlreadyExists, ...).
"""
from ctrd import errors

from .client import AsyncClient
from .sync import Client

__all__ = ["AsyncClient", "Client", "errors"]
