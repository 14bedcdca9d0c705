"""Make every object the zygote holds immortal, so forked shims stop copying its pages.

A forked shim shares the zygote's memory until it writes to a page. CPython writes
to an object whenever it takes or drops a reference to it, so merely running shared
code (functions, their code objects, strings, types, module dicts) copies page after
page: on 3.11 a shim ended up owning about 4.6 MiB, nearly all of it pages where
only a reference count had changed.

CPython 3.12 (PEP 683) skips reference counting on *immortal* objects: those whose
count holds a reserved value. The interpreter gives that value to its own static
objects only; here the zygote gives it, once, to everything reachable from its
modules and its collector's lists, right before ``gc.freeze()``. Measured with 50
containers: 5.9 -> 4.2 MiB per running container.

What this costs: these objects are never freed. The zygote keeps them for its whole
life anyway; a shim that drops one (a replaced dict value, say) leaks those bytes.

The reserved value is a fact of each interpreter's object layout, so this is done
only where it was checked against the headers: CPython 3.12 and 3.13, 64-bit, with
the GIL (``Py_INCREF`` there adds one to the low 32 bits and stores nothing when
they wrap to zero; ``Py_DECREF`` returns early when they read as negative). Any
other interpreter gets no change and a shim that owns more.
"""
from __future__ import annotations

import ctypes
import gc
import sys
import sysconfig
from collections.abc import Iterable

# _Py_IMMORTAL_REFCNT for 64-bit builds with the GIL: UINT_MAX in the low 32 bits.
IMMORTAL_REFCNT = 0xFFFFFFFF


def supported() -> bool:
    return (sys.implementation.name == "cpython"
            and sys.version_info[:2] in ((3, 12), (3, 13))
            and ctypes.sizeof(ctypes.c_void_p) == 8
            and not sysconfig.get_config_var("Py_GIL_DISABLED"))


def immortalize(extra_roots: Iterable[object] = ()) -> tuple[int, int]:
    """Mark everything reachable as immortal; returns (objects seen, newly marked).

    Must run before ``gc.freeze()``: a frozen object is no longer listed by
    ``gc.get_objects()``. Run it once: walking again allocates enough to set off a
    full collection, which writes every object's collector header in the zygote, and
    every page the zygote writes after a fork is copied into the shims forked before.
    """
    if not supported():
        return 0, 0
    stack: list[object] = gc.get_objects()
    stack.extend(sys.modules.values())
    stack.extend(extra_roots)
    seen: set[int] = set()
    found: list[object] = []  # holds each object alive until it is marked
    while stack:
        obj = stack.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        found.append(obj)
        # Reaches what the collector does not track (str, bytes, int, code, ...).
        stack.extend(gc.get_referents(obj))
    marked = 0
    for obj in found:
        refcnt = ctypes.c_ssize_t.from_address(id(obj))
        if refcnt.value & 0xFFFFFFFF != IMMORTAL_REFCNT:
            refcnt.value = IMMORTAL_REFCNT
            marked += 1
    return len(found), marked
