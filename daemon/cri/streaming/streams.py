"""What a remote command sees of its client, whatever the wire (WebSocket or SPDY).

Kubernetes' remotecommand protocol gives an exec up to five streams: stdin, stdout and
stderr, an error stream on which the server writes the command's final status (a
``metav1.Status`` object in JSON) and a resize stream on which the client sends terminal
sizes (``{"Width": w, "Height": h}``). A protocol module parses its wire into a
:class:`CommandStreams`; the exec code only deals with this class.
"""
from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

# The protocol versions of remotecommand, newest first; a client offers some of them.
V5 = "v5.channel.k8s.io"  # v4 plus closing stdin on its own (WebSocket only)
V4 = "v4.channel.k8s.io"  # the status on the error stream is a metav1.Status in JSON
V3 = "v3.channel.k8s.io"  # adds the resize stream
V2 = "v2.channel.k8s.io"
V1 = "channel.k8s.io"


@dataclass(frozen=True)
class Options:
    """What the client asked for (exec's query parameters)."""

    stdin: bool = False
    stdout: bool = False
    stderr: bool = False
    tty: bool = False


@dataclass
class CommandStreams:
    """The client's side of one remote command.

    ``stdin`` is fed by the protocol and gets EOF when the client closes it (or the
    connection ends); ``resizes`` gets (width, height) pairs. ``write_stdout`` and
    ``write_stderr`` send output; ``finish`` sends the final status and ends the
    session. They are plain callables so that each protocol supplies its own.
    """

    options: Options
    version: str
    write_stdout: Callable[[bytes], Awaitable[None]]
    write_stderr: Callable[[bytes], Awaitable[None]]
    send_status: Callable[[bytes], Awaitable[None]]
    stdin: asyncio.StreamReader | None = None
    resizes: asyncio.Queue[tuple[int, int]] = field(default_factory=asyncio.Queue)
    # Set by the protocol when the client went away: the command is then killed.
    disconnected: asyncio.Event = field(default_factory=asyncio.Event)

    async def finish(self, exit_code: int | None, error: str = "") -> None:
        """The command ended: tell the client how, as kubelet's streaming server does."""
        await self.send_status(json.dumps(status(exit_code, error)).encode())


def status(exit_code: int | None, error: str = "") -> dict[str, Any]:
    """The metav1.Status a v4+ client reads: Success, or the exit code as a cause."""
    if exit_code == 0 and not error:
        return {"metadata": {}, "status": "Success"}
    if exit_code is None:
        return {"metadata": {}, "status": "Failure", "message": error or "unknown error"}
    return {
        "metadata": {}, "status": "Failure",
        "message": error or f"command terminated with non-zero exit code: {exit_code}",
        "reason": "NonZeroExitCode",
        "details": {"causes": [{"reason": "ExitCode", "message": str(exit_code)}]},
    }


def parse_resize(data: bytes) -> tuple[int, int] | None:
    """A resize message, or None if it is not one (clients' junk is ignored)."""
    try:
        value = json.loads(data)
        width, height = int(value["Width"]), int(value["Height"])
    except (ValueError, KeyError, TypeError):
        return None
    if not (0 < width <= 0xFFFF and 0 < height <= 0xFFFF):
        return None
    return width, height
