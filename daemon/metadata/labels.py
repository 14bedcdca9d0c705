"""Label rules shared by every store: the size limit and field-path updates."""
from __future__ import annotations

import json
from collections.abc import Mapping, Sequence

from ctrd.errors import InvalidArgument

MAX_LABEL_SIZE = 4096


def validate(labels: Mapping[str, str], what: str = "labels") -> None:
    for key, value in labels.items():
        if len(key.encode()) + len(value.encode()) > MAX_LABEL_SIZE:
            raise InvalidArgument(
                f"{what}: label key and value greater than maximum size "
                f"({MAX_LABEL_SIZE} bytes), key: {key[:10]}")


def apply_paths(current: Mapping[str, str], new: Mapping[str, str],
                paths: Sequence[str]) -> dict[str, str]:
    """Labels after an update: ``labels`` replaces all, ``labels.<k>`` sets or clears one."""
    result = dict(current)
    for path in paths:
        if path == "labels":
            result = dict(new)
        elif path.startswith("labels."):
            key = path[len("labels."):]
            if new.get(key):
                result[key] = new[key]
            else:
                result.pop(key, None)
        else:
            raise InvalidArgument(f'cannot update "{path}" field')
    return result


def dumps(labels: Mapping[str, str]) -> str:
    return json.dumps(dict(labels), sort_keys=True, separators=(",", ":"))


def loads(text: str | None) -> dict[str, str]:
    return json.loads(text) if text else {}
