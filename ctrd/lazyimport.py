"""Modules loaded on first use instead of at import.

The daemon imports every plugin at start, but some libraries serve only a few of
its requests: httpx (with h11, httpcore, anyio and click, ~4.7 MiB and ~100 ms) is
needed only once a registry is contacted. What the daemon holds is part of every
running container's share of memory, so it should not hold what it may never use.
"""
from __future__ import annotations

import importlib.util
import sys
from types import ModuleType


def lazy_module(name: str) -> ModuleType:
    """``name`` as a module object whose code runs on its first attribute access."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.find_spec(name)
    if spec is None or spec.loader is None:
        raise ModuleNotFoundError(f"No module named {name!r}", name=name)
    loader = importlib.util.LazyLoader(spec.loader)
    spec.loader = loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    loader.exec_module(module)
    return module
