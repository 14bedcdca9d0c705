"""A minimal structured logger for the shim.

structlog pulls in asyncio and rich (about 200 ms and 15 MB here), which would
dominate the shim's start-up and footprint; this writes the same kind of one-line
key=value events. The shim's stderr is the ``log`` fifo of its bundle, which the
daemon copies into its own log.
"""
from __future__ import annotations

import os
import sys
import time
import traceback
from typing import Any

LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40}


def _value(v: Any) -> str:
    s = str(v)
    if not s or any(c in s for c in ' ="\n\t'):
        return '"' + s.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    return s


class Logger:
    def __init__(self, fields: dict[str, Any] | None = None, level: str = "info",
                 fd: int | None = None) -> None:
        self._fields = fields or {}
        self._level = LEVELS[level]
        self._fd = fd

    def bind(self, **fields: Any) -> Logger:
        return Logger({**self._fields, **fields}, _name(self._level), self._fd)

    def debug(self, event: str, **kw: Any) -> None:
        self._emit(10, event, kw)

    def info(self, event: str, **kw: Any) -> None:
        self._emit(20, event, kw)

    def warning(self, event: str, **kw: Any) -> None:
        self._emit(30, event, kw)

    def error(self, event: str, **kw: Any) -> None:
        self._emit(40, event, kw)

    def exception(self, event: str, **kw: Any) -> None:
        kw["exc"] = traceback.format_exc().strip()
        self._emit(40, event, kw)

    def _emit(self, level: int, event: str, kw: dict[str, Any]) -> None:
        if level < self._level:
            return
        now = time.time()
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now % 1 * 1e6):06d}Z"
        parts = [f"time={stamp}", f"level={_name(level)}", f"event={_value(event)}"]
        parts += [f"{k}={_value(v)}" for k, v in {**self._fields, **kw}.items()]
        line = (" ".join(parts) + "\n").encode()
        try:
            # One write per line keeps lines from different threads whole.
            os.write(self._fd if self._fd is not None else sys.stderr.fileno(), line)
        except OSError:
            pass  # nobody reads the log any more; the shim must keep working


def _name(level: int) -> str:
    return next(name for name, value in LEVELS.items() if value == level)
