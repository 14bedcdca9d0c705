"""Server-side default OCI runtime specs, for ctrd's own clients and CRI.

The defaults are containerd's (oci/spec.go, oci/mounts.go): the five namespaces
a container gets, the capability set Docker made customary, masked and read-only
/proc and /sys paths, an open-files limit, a cgroup under ``/<namespace>/<id>``,
all devices denied, and no new privileges. ``with_image_config`` then applies an
image's entrypoint, command, environment, user and working directory the way
containerd's ``WithImageConfigArgs`` does. Specs are plain dicts, ready for JSON.
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from ctrd.errors import InvalidArgument, NotFound

from .seccomp import default_profile

SPEC_VERSION = "1.0.2-dev"
DEFAULT_PATH = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# runc refuses ids above this, so containerd does too.
MAX_ID = 2**31 - 1

DEFAULT_CAPABILITIES = (
    "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FSETID", "CAP_FOWNER", "CAP_MKNOD", "CAP_NET_RAW",
    "CAP_SETGID", "CAP_SETUID", "CAP_SETFCAP", "CAP_SETPCAP", "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT", "CAP_KILL", "CAP_AUDIT_WRITE",
)
DEFAULT_NAMESPACES = ("pid", "ipc", "uts", "mount", "network")
MASKED_PATHS = (
    "/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys", "/proc/latency_stats",
    "/proc/timer_list", "/proc/timer_stats", "/proc/sched_debug", "/sys/firmware", "/proc/scsi",
)
READONLY_PATHS = ("/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger")


def _mount(dest: str, type_: str, source: str, *options: str) -> dict[str, Any]:
    return {"destination": dest, "type": type_, "source": source, "options": list(options)}


def default_mounts() -> list[dict[str, Any]]:
    return [
        _mount("/proc", "proc", "proc", "nosuid", "noexec", "nodev"),
        _mount("/dev", "tmpfs", "tmpfs", "nosuid", "strictatime", "mode=755", "size=65536k"),
        _mount("/dev/pts", "devpts", "devpts", "nosuid", "noexec", "newinstance",
               "ptmxmode=0666", "mode=0620", "gid=5"),
        _mount("/dev/shm", "tmpfs", "shm", "nosuid", "noexec", "nodev", "mode=1777",
               "size=65536k"),
        _mount("/dev/mqueue", "mqueue", "mqueue", "nosuid", "noexec", "nodev"),
        _mount("/sys", "sysfs", "sysfs", "nosuid", "noexec", "nodev", "ro"),
        _mount("/run", "tmpfs", "tmpfs", "nosuid", "strictatime", "mode=755", "size=65536k"),
    ]


def default_spec(namespace: str, id_: str, *, args: Sequence[str] = (),
                 rootfs: str = "rootfs", seccomp: bool = True) -> dict[str, Any]:
    """A spec for container ``id_`` of ``namespace``; ``rootfs`` is relative to the bundle
    unless absolute."""
    caps = list(DEFAULT_CAPABILITIES)
    spec: dict[str, Any] = {
        "ociVersion": SPEC_VERSION,
        "root": {"path": rootfs},
        "process": {
            "user": {"uid": 0, "gid": 0},
            "args": list(args),
            "env": [DEFAULT_PATH],
            "cwd": "/",
            "capabilities": {"bounding": caps[:], "permitted": caps[:], "effective": caps[:]},
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}],
            "noNewPrivileges": True,
        },
        "mounts": default_mounts(),
        "linux": {
            "resources": {"devices": [{"allow": False, "access": "rwm"}]},
            "cgroupsPath": f"/{namespace}/{id_}",
            "namespaces": [{"type": t} for t in DEFAULT_NAMESPACES],
            "maskedPaths": list(MASKED_PATHS),
            "readonlyPaths": list(READONLY_PATHS),
        },
    }
    if seccomp:
        with_default_seccomp(spec)
    return spec


def with_default_seccomp(spec: dict[str, Any]) -> dict[str, Any]:
    caps = spec.get("process", {}).get("capabilities", {}).get("bounding", [])
    spec.setdefault("linux", {})["seccomp"] = default_profile(caps, os.uname().machine)
    return spec


def merge_env(defaults: Iterable[str], overrides: Iterable[str]) -> list[str]:
    """``overrides`` replace same-named ``defaults`` in place; new names are appended;
    a bare ``NAME`` in ``overrides`` removes it (containerd's replaceOrAppendEnvValues)."""
    result = list(defaults)
    index = {e.split("=", 1)[0]: i for i, e in enumerate(result)}
    removed: set[int] = set()
    for entry in overrides:
        name = entry.split("=", 1)[0]
        if "=" not in entry:
            if name in index:
                removed.add(index[name])
            continue
        if name in index:
            result[index[name]] = entry
            removed.discard(index[name])
        else:
            index[name] = len(result)
            result.append(entry)
    return [e for i, e in enumerate(result) if i not in removed]


def with_image_config(spec: dict[str, Any], config: Mapping[str, Any],
                      args: Sequence[str] = (), rootfs: Path | None = None) -> dict[str, Any]:
    """Apply the ``config`` object of an OCI image configuration.

    ``args`` replace the image's Cmd (the Entrypoint stays). ``rootfs``, the container's
    root folder on the host, is where user and group names are looked up."""
    process = spec.setdefault("process", {})
    process["env"] = merge_env(config.get("Env") or [DEFAULT_PATH], process.get("env", []))
    cmd = list(args) or list(config.get("Cmd") or [])
    process["args"] = list(config.get("Entrypoint") or []) + cmd
    process["cwd"] = config.get("WorkingDir") or "/"
    user = config.get("User") or ""
    if user:
        with_user(spec, user, rootfs)
        with_additional_gids(spec, str(process["user"]["uid"]), rootfs)
    else:
        with_additional_gids(spec, "root", rootfs)
    return spec


def _read_db(rootfs: Path | None, name: str) -> list[list[str]]:
    if rootfs is None:
        return []
    try:
        text = (rootfs / "etc" / name).read_text()
    except OSError:
        return []
    return [line.split(":") for line in text.splitlines()
            if line and not line.startswith("#") and line.count(":") >= 2]


def _parse_id(text: str, what: str) -> int | None:
    if not text.isdigit():
        return None
    value = int(text)
    if value > MAX_ID:
        raise InvalidArgument(f"{what} {value} is out of range (at most {MAX_ID})")
    return value


def with_user(spec: dict[str, Any], user: str, rootfs: Path | None = None) -> dict[str, Any]:
    """``uid``, ``uid:gid``, ``name`` or ``name:group``, names looked up in the rootfs."""
    name, _, group = user.partition(":")
    passwd = _read_db(rootfs, "passwd")
    uid = _parse_id(name, "uid")
    gid: int | None = None
    if uid is None:
        entry = next((e for e in passwd if e[0] == name), None)
        if entry is None:
            raise NotFound(f"no users found with name {name!r} in the container's /etc/passwd")
        uid, gid = int(entry[2]), int(entry[3])
    elif not group:
        entry = next((e for e in passwd if e[2] == str(uid)), None)
        gid = int(entry[3]) if entry else 0
    if group:
        gid = _parse_id(group, "gid")
        if gid is None:
            entry = next((e for e in _read_db(rootfs, "group") if e[0] == group), None)
            if entry is None:
                raise NotFound(f"no groups found with name {group!r} in the container's /etc/group")
            gid = int(entry[2])
    spec.setdefault("process", {})["user"] = {"uid": uid, "gid": gid or 0}
    return spec


def with_additional_gids(spec: dict[str, Any], user: str, rootfs: Path | None) -> dict[str, Any]:
    """Supplementary groups of ``user`` (a name or uid) from the rootfs' /etc/group."""
    proc_user = spec.setdefault("process", {}).setdefault("user", {"uid": 0, "gid": 0})
    passwd = _read_db(rootfs, "passwd")
    entry = next((e for e in passwd if e[0] == user or e[2] == user), None)
    name = entry[0] if entry else user
    gids = [int(g[2]) for g in _read_db(rootfs, "group")
            if len(g) > 3 and name in g[3].split(",") and g[2].isdigit()]
    extra = sorted({proc_user.get("gid", 0), *gids})
    proc_user["additionalGids"] = extra
    return spec


def with_memory_limit(spec: dict[str, Any], limit: int) -> dict[str, Any]:
    spec.setdefault("linux", {}).setdefault("resources", {}).setdefault("memory", {})[
        "limit"] = limit
    return spec


def with_host_network(spec: dict[str, Any]) -> dict[str, Any]:
    linux = spec.setdefault("linux", {})
    linux["namespaces"] = [n for n in linux.get("namespaces", []) if n["type"] != "network"]
    taken = ("/etc/hosts", "/etc/resolv.conf")
    spec["mounts"] = [m for m in spec.get("mounts", []) if m["destination"] not in taken]
    for path in ("/etc/hosts", "/etc/resolv.conf"):
        if os.path.exists(path):
            spec["mounts"].append(_mount(path, "bind", path, "rbind", "ro"))
    return spec


def with_readonly_rootfs(spec: dict[str, Any]) -> dict[str, Any]:
    spec.setdefault("root", {})["readonly"] = True
    return spec


def with_tty(spec: dict[str, Any]) -> dict[str, Any]:
    process = spec.setdefault("process", {})
    process["terminal"] = True
    process["env"] = merge_env(process.get("env", []), ["TERM=xterm"])
    return spec


def dumps(spec: Mapping[str, Any]) -> bytes:
    return json.dumps(spec, separators=(",", ":")).encode()
