"""What `ctrctl run` and `exec` add to the shared spec generator (ctrd.oci.spec).

containerd's clients generate the spec themselves (the daemon stores it opaquely),
so `ctrctl run` must too, for real containerd as for ctrd. The defaults and the
image config handling are the shared generator's; here are the command line's
own options, their parsing, and Docker's habits (a short hostname, the cgroup
mount) that a CLI user expects.
"""
from __future__ import annotations

import re
import socket
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ctrd import errors
from ctrd.oci import spec as oci
# Part of this module's interface: SpecOptions.user holds a User.
from ctrd.oci.spec import User, needs_lookup, resolve_user

__all__ = ["SpecOptions", "User", "build", "needs_lookup", "parse_env", "parse_size",
           "process_for_exec", "resolve_user"]

_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([kmgt]?)i?b?", re.IGNORECASE)
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


@dataclass
class SpecOptions:
    """What `run` can change about the default spec."""

    args: Sequence[str] = ()           # replaces the image's Cmd (Entrypoint stays)
    entrypoint: Sequence[str] | None = None
    env: Sequence[str] = ()            # KEY=VALUE, overriding the image's
    cwd: str = ""
    user: User | None = None           # None: root, or what the image resolved to
    terminal: bool = False
    memory: int | None = None          # bytes
    read_only: bool = False
    host_network: bool = False
    hostname: str = ""
    extra_mounts: list[dict[str, Any]] = field(default_factory=list)


def parse_size(text: str) -> int:
    """Bytes in a docker-style size: 512, 64k, 100m, 1.5g."""
    found = _SIZE.fullmatch(text.strip())
    if not found:
        raise errors.InvalidArgument(f"invalid size {text!r}: want e.g. 64m, 1g")
    value = int(float(found[1]) * _UNITS[found[2].lower()])
    if value <= 0:
        raise errors.InvalidArgument(f"invalid size {text!r}: must be positive")
    return value


def parse_env(items: Sequence[str]) -> list[str]:
    out = []
    for item in items:
        key, sep, _ = item.partition("=")
        if not key or any(c.isspace() for c in key):
            raise errors.InvalidArgument(f"invalid environment variable {item!r}")
        out.append(item if sep else f"{item}=")
    return out


def build(container_id: str, namespace: str, image_config: dict[str, Any],
          options: SpecOptions) -> dict[str, Any]:
    """The spec for a container of an image (its config's ``config`` object applies)."""
    spec = oci.with_cgroup_mount(oci.default_spec(namespace, container_id))
    conf = dict(image_config.get("config") or {})
    # The image's user was resolved by the caller, in the image's own files
    # (SpecOptions.user): this side has no root folder to look names up in.
    conf["User"] = ""
    if options.cwd:
        conf["WorkingDir"] = options.cwd
    oci.with_image_config(spec, conf, options.args, entrypoint=options.entrypoint)
    if not spec["process"]["args"]:
        raise errors.InvalidArgument("no command: the image has none, give one after the image")
    if options.terminal:
        oci.with_tty(spec)
    else:
        spec["process"]["terminal"] = False
    oci.with_env(spec, parse_env(options.env))
    if options.user is not None:
        oci.with_user_ids(spec, options.user)
    if options.memory is not None:
        oci.with_memory_limit(spec, options.memory)
    if options.read_only:
        oci.with_readonly_rootfs(spec)
    spec["hostname"] = options.hostname or container_id[:12]
    if options.host_network:
        oci.with_host_network(spec)
        spec["hostname"] = options.hostname or socket.gethostname()
    spec["mounts"].extend(options.extra_mounts)
    return spec


def process_for_exec(spec: dict[str, Any], args: Sequence[str], *, terminal: bool,
                     env: Sequence[str] = (), cwd: str = "",
                     user: User | None = None) -> dict[str, Any]:
    """The OCI process of an exec: the container's own, with new args and stdio mode."""
    if not args:
        raise errors.InvalidArgument("exec needs a command")
    process = dict(spec.get("process") or {})
    process["args"] = list(args)
    process["terminal"] = terminal
    base_env = list(process.get("env") or [])
    if terminal:
        base_env = oci.merge_env(base_env, ["TERM=xterm"])
    process["env"] = oci.merge_env(base_env, parse_env(env))
    if cwd:
        process["cwd"] = cwd
    if user is not None:
        process["user"] = {"uid": user.uid, "gid": user.gid}
    process.pop("consoleSize", None)
    return process
