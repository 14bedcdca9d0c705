"""JSON documents (manifests, indexes, configs) read from the content store.

Every transfer parses such blobs and must turn bad bytes into InvalidArgument, naming
the blob so the caller can tell which one of a whole tree was wrong.
"""
from __future__ import annotations

import json
from typing import Any

from ctrd.errors import InvalidArgument


def parse(data: bytes, what: str) -> Any:
    """Any JSON value; ``what`` names the document in the error."""
    try:
        return json.loads(data)
    except ValueError as exc:
        raise InvalidArgument(f"{what} is not valid JSON: {exc}") from None


async def read_json(content: Any, namespace: str, dgst: str, what: str) -> dict[str, Any]:
    """The blob ``dgst`` of ``namespace``, which must hold a JSON object."""
    chunks = [c async for c in await content.read(namespace, dgst)]
    value = parse(b"".join(chunks), what)
    if not isinstance(value, dict):
        raise InvalidArgument(f"{what} is not a JSON object")
    return value
