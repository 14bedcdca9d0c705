"""The event exchange plugin."""
from __future__ import annotations

from ..plugin import InitContext
from .exchange import Exchange


def init(ctx: InitContext) -> Exchange:
    return Exchange()
