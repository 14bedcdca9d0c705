"""A default OCI runtime spec for a container, built on the client.

containerd's clients generate the spec themselves (the daemon stores it opaquely),
so `ctrctl run` must too, for real containerd as for ctrd. The defaults follow what
containerd's Go client gives a Linux container: the usual namespaces, a small
capability set, the standard /proc, /dev and /sys mounts, masked kernel paths,
and the process taken from the image config.
"""
from __future__ import annotations

import re
import socket
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ctrd import errors

OCI_VERSION = "1.0.2-dev"
DEFAULT_PATH = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

CAPABILITIES = [
    "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FSETID", "CAP_FOWNER", "CAP_MKNOD", "CAP_NET_RAW",
    "CAP_SETGID", "CAP_SETUID", "CAP_SETFCAP", "CAP_SETPCAP", "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT", "CAP_KILL", "CAP_AUDIT_WRITE",
]
MASKED_PATHS = [
    "/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys", "/proc/latency_stats",
    "/proc/timer_list", "/proc/timer_stats", "/proc/sched_debug", "/sys/firmware", "/proc/scsi",
]
READONLY_PATHS = ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"]
# (major, minor) of the character devices every container may use; None = any minor.
ALLOWED_DEVICES: list[tuple[int, int | None]] = [
    (1, 3), (1, 5), (1, 7), (1, 8), (1, 9),  # null zero full random urandom
    (5, 0), (5, 1), (5, 2),                  # tty console ptmx
    (136, None),                             # pty slaves
    (10, 200),                               # tun
]

_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([kmgt]?)i?b?", re.IGNORECASE)
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


@dataclass(frozen=True)
class User:
    uid: int
    gid: int
    additional_gids: tuple[int, ...] = ()


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


def merge_env(base: Sequence[str], overrides: Sequence[str]) -> list[str]:
    """``base`` with every variable of ``overrides`` replaced or appended, order kept."""
    merged: dict[str, str] = {}
    for item in [*base, *overrides]:
        key = item.partition("=")[0]
        merged[key] = item
    return list(merged.values())


def default_spec(container_id: str, namespace: str) -> dict[str, Any]:
    devices = [{"allow": False, "access": "rwm"}]
    devices += [{"allow": True, "type": "c", "major": major,
                 **({"minor": minor} if minor is not None else {}), "access": "rwm"}
                for major, minor in ALLOWED_DEVICES]
    return {
        "ociVersion": OCI_VERSION,
        "root": {"path": "rootfs"},
        "process": {
            "user": {"uid": 0, "gid": 0},
            "cwd": "/",
            "env": [DEFAULT_PATH],
            "capabilities": {k: list(CAPABILITIES) for k in ("bounding", "effective", "permitted")},
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}],
            "noNewPrivileges": True,
        },
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc",
             "options": ["nosuid", "noexec", "nodev"]},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
             "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
            {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
             "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620",
                         "gid=5"]},
            {"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
             "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]},
            {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue",
             "options": ["nosuid", "noexec", "nodev"]},
            {"destination": "/sys", "type": "sysfs", "source": "sysfs",
             "options": ["nosuid", "noexec", "nodev", "ro"]},
            # As docker does: lets a process read its own limits.
            {"destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup",
             "options": ["ro", "nosuid", "noexec", "nodev"]},
            {"destination": "/run", "type": "tmpfs", "source": "tmpfs",
             "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
        ],
        "linux": {
            "resources": {"devices": devices},
            "cgroupsPath": f"/{namespace}/{container_id}",
            "namespaces": [{"type": t} for t in ("pid", "ipc", "uts", "mount", "network")],
            "maskedPaths": list(MASKED_PATHS),
            "readonlyPaths": list(READONLY_PATHS),
        },
    }


def build(container_id: str, namespace: str, image_config: dict[str, Any],
          options: SpecOptions) -> dict[str, Any]:
    """The spec for a container of an image (its config's ``config`` object applies)."""
    spec = default_spec(container_id, namespace)
    process = spec["process"]
    conf = image_config.get("config") or {}
    entrypoint = list(options.entrypoint if options.entrypoint is not None
                      else conf.get("Entrypoint") or [])
    cmd = list(options.args) if options.args else list(conf.get("Cmd") or [])
    args = entrypoint + cmd
    if not args:
        raise errors.InvalidArgument("no command: the image has none, give one after the image")
    process["args"] = args
    env = merge_env(process["env"], conf.get("Env") or [])
    if options.terminal:
        env = merge_env(env, ["TERM=xterm"])
    process["env"] = merge_env(env, parse_env(options.env))
    process["cwd"] = options.cwd or conf.get("WorkingDir") or "/"
    if not process["cwd"].startswith("/"):
        raise errors.InvalidArgument(f"working directory {process['cwd']!r} must be absolute")
    if options.user is not None:
        process["user"] = {"uid": options.user.uid, "gid": options.user.gid}
        if options.user.additional_gids:
            process["user"]["additionalGids"] = list(options.user.additional_gids)
    process["terminal"] = options.terminal
    if options.memory is not None:
        spec["linux"]["resources"]["memory"] = {"limit": options.memory}
    if options.read_only:
        spec["root"]["readonly"] = True
    spec["hostname"] = options.hostname or container_id[:12]
    if options.host_network:
        spec["linux"]["namespaces"] = [n for n in spec["linux"]["namespaces"]
                                       if n["type"] != "network"]
        spec["hostname"] = options.hostname or socket.gethostname()
        for path in ("/etc/hosts", "/etc/resolv.conf"):
            spec["mounts"].append({"destination": path, "type": "bind", "source": path,
                                   "options": ["rbind", "ro"]})
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
        base_env = merge_env(base_env, ["TERM=xterm"])
    process["env"] = merge_env(base_env, parse_env(env))
    if cwd:
        process["cwd"] = cwd
    if user is not None:
        process["user"] = {"uid": user.uid, "gid": user.gid}
    process.pop("consoleSize", None)
    return process


def needs_lookup(user: str) -> bool:
    """Whether resolving ``user`` needs the container's /etc/passwd or /etc/group."""
    name, _, group = user.partition(":")
    return not name.isdigit() or (bool(group) and not group.isdigit()) or not group


def resolve_user(user: str, passwd: str | None, group: str | None) -> User:
    """uid/gid for docker's user syntax: ``name|uid[:group|gid]``, looked up in the
    container's passwd and group files (None when the image has none)."""
    if not user:
        return User(0, 0)
    name, sep, grp = user.partition(":")
    if sep and not grp or not name:
        raise errors.InvalidArgument(f"invalid user {user!r}")
    users = _table(passwd)
    uid: int | None = None
    gid: int | None = None
    for fields in users:
        if len(fields) >= 4 and (fields[0] == name or (name.isdigit() and fields[2] == name)):
            uid, gid = _int(fields[2]), _int(fields[3])
            break
    if uid is None:
        if not name.isdigit():
            raise errors.NotFound(f"no user {name!r} in the container's /etc/passwd")
        uid, gid = int(name), 0
    if grp:
        if grp.isdigit():
            gid = int(grp)
        else:
            found = [f for f in _table(group) if len(f) >= 3 and f[0] == grp]
            if not found:
                raise errors.NotFound(f"no group {grp!r} in the container's /etc/group")
            gid = _int(found[0][2])
    return User(uid, gid or 0)


def _table(text: str | None) -> list[list[str]]:
    if not text:
        return []
    return [line.split(":") for line in text.splitlines() if line and not line.startswith("#")]


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise errors.InvalidArgument(f"invalid id {text!r} in the container's user files") \
            from None
