"""Undoing what a pod or container holds, where being gone already is success."""
from __future__ import annotations

from typing import Any

from ctrd.errors import NotFound

from ..runtime.shim_manager import TaskManager
from .config import NAMESPACE


async def delete_task(tasks: TaskManager, id_: str) -> None:
    try:
        await tasks.delete(NAMESPACE, id_)
    except NotFound:
        pass


async def remove_snapshot(snapshots: Any, snapshotter: str, key: str) -> None:
    try:
        await snapshots.remove(NAMESPACE, snapshotter, key)
    except NotFound:
        pass
