"""Default OCI runtime specs, built the same way by the daemon (CRI later) and the client.

containerd's API has no call that returns a spec: its clients build one and the
daemon stores it as given. Both sides here share this generator so a container
gets the same defaults whoever creates it. They are containerd's (oci/spec.go,
oci/mounts.go): five namespaces, the capability set Docker made customary, masked
and read-only /proc and /sys paths, an open-files limit, a cgroup under
``/<namespace>/<id>``, all devices denied (runc adds the harmless ones back), no new
privileges, and a default seccomp profile. The ``with_*`` functions then change a
spec as containerd's SpecOpts do, the image config first (``WithImageConfigArgs``).
Specs are plain dicts, ready for JSON. Nothing here imports grpc.
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
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


@dataclass(frozen=True)
class User:
    uid: int
    gid: int
    additional_gids: tuple[int, ...] = ()


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
            # Only a fallback for specs made without an image: with_image_config drops it.
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


def with_env(spec: dict[str, Any], env: Iterable[str]) -> dict[str, Any]:
    process = spec.setdefault("process", {})
    process["env"] = merge_env(process.get("env", []), env)
    return spec


def with_image_config(spec: dict[str, Any], config: Mapping[str, Any],
                      args: Sequence[str] = (), rootfs: Path | None = None, *,
                      entrypoint: Sequence[str] | None = None) -> dict[str, Any]:
    """Apply the ``config`` object of an OCI image configuration.

    ``args`` replace the image's Cmd and ``entrypoint``, unless None, its Entrypoint.
    ``rootfs``, the container's root folder on the host, is where user and group names
    are looked up. Variables already in the spec override the image's."""
    process = spec.setdefault("process", {})
    # The image's PATH wins over the generator's fallback one.
    own = [e for e in process.get("env", []) if e != DEFAULT_PATH]
    process["env"] = merge_env(config.get("Env") or [DEFAULT_PATH], own)
    cmd = list(args) or list(config.get("Cmd") or [])
    first = config.get("Entrypoint") if entrypoint is None else entrypoint
    process["args"] = list(first or []) + cmd
    with_cwd(spec, config.get("WorkingDir") or "/")
    user = config.get("User") or ""
    if user:
        with_user(spec, user, rootfs)
        with_additional_gids(spec, str(process["user"]["uid"]), rootfs)
    else:
        with_additional_gids(spec, "root", rootfs)
    return spec


def with_cwd(spec: dict[str, Any], cwd: str) -> dict[str, Any]:
    # runc would refuse it later, with a less helpful message.
    if not cwd.startswith("/"):
        raise InvalidArgument(f"working directory {cwd!r} must be absolute")
    spec.setdefault("process", {})["cwd"] = cwd
    return spec


# -- users ------------------------------------------------------------------------------


def needs_lookup(user: str) -> bool:
    """Whether resolving ``user`` needs the container's /etc/passwd or /etc/group."""
    name, _, group = user.partition(":")
    return not name.isdigit() or (bool(group) and not group.isdigit()) or not group


def resolve_user(user: str, passwd: str | None, group: str | None) -> User:
    """uid/gid for the ``name|uid[:group|gid]`` syntax, looked up in the container's
    passwd and group files (their text; None when the image has none)."""
    if not user:
        return User(0, 0)
    name, sep, grp = user.partition(":")
    if sep and not grp or not name:
        raise InvalidArgument(f"invalid user {user!r}")
    uid: int | None = None
    gid: int | None = None
    for fields in _table(passwd):
        if len(fields) >= 4 and (fields[0] == name or (name.isdigit() and fields[2] == name)):
            uid, gid = _id(fields[2], "uid"), _id(fields[3], "gid")
            break
    if uid is None:
        if not name.isdigit():
            raise NotFound(f"no user {name!r} in the container's /etc/passwd")
        uid, gid = _id(name, "uid"), 0
    if grp:
        if grp.isdigit():
            gid = _id(grp, "gid")
        else:
            found = [f for f in _table(group) if len(f) >= 3 and f[0] == grp]
            if not found:
                raise NotFound(f"no group {grp!r} in the container's /etc/group")
            gid = _id(found[0][2], "gid")
    return User(uid, gid or 0)


def additional_gids(user: str, primary: int, passwd: str | None,
                    group: str | None) -> list[int]:
    """The primary group, then the groups listing ``user`` (a name, or a uid named in
    passwd) as a member, as containerd's WithAdditionalGIDs gives them."""
    name = user
    if user.isdigit():
        entry = next((e for e in _table(passwd) if len(e) >= 3 and e[2] == user), None)
        name = entry[0] if entry else ""
    extra = [_id(g[2], "gid") for g in _table(group) if name and len(g) >= 4
             and g[0] != name and name in g[3].split(",")]
    return extra if primary in extra else [primary, *extra]


def with_user_ids(spec: dict[str, Any], user: User) -> dict[str, Any]:
    entry: dict[str, Any] = {"uid": user.uid, "gid": user.gid}
    if user.additional_gids:
        entry["additionalGids"] = list(user.additional_gids)
    spec.setdefault("process", {})["user"] = entry
    return spec


def with_user(spec: dict[str, Any], user: str, rootfs: Path | None = None) -> dict[str, Any]:
    """``user`` in the ``name|uid[:group|gid]`` syntax, names looked up in the rootfs."""
    return with_user_ids(spec, resolve_user(user, *_accounts(rootfs)))


def with_additional_gids(spec: dict[str, Any], user: str, rootfs: Path | None) -> dict[str, Any]:
    """Supplementary groups of ``user`` (a name or uid) from the rootfs' /etc/group."""
    proc_user = spec.setdefault("process", {}).setdefault("user", {"uid": 0, "gid": 0})
    proc_user["additionalGids"] = additional_gids(user, proc_user.get("gid", 0),
                                                  *_accounts(rootfs))
    return spec


def _accounts(rootfs: Path | None) -> tuple[str | None, str | None]:
    """The text of the rootfs' /etc/passwd and /etc/group, None for a missing one."""
    def read(name: str) -> str | None:
        if rootfs is None:
            return None
        try:
            return (rootfs / "etc" / name).read_text()
        except OSError:
            return None
    return read("passwd"), read("group")


def _table(text: str | None) -> list[list[str]]:
    if not text:
        return []
    return [line.split(":") for line in text.splitlines() if line and not line.startswith("#")]


def _id(text: str, what: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise InvalidArgument(f"invalid {what} {text!r} in the container's user files") \
            from None
    if not 0 <= value <= MAX_ID:
        raise InvalidArgument(f"{what} {value} is out of range (at most {MAX_ID})")
    return value


# -- resources, network, terminal ---------------------------------------------------------


def with_memory_limit(spec: dict[str, Any], limit: int) -> dict[str, Any]:
    spec.setdefault("linux", {}).setdefault("resources", {}).setdefault("memory", {})[
        "limit"] = limit
    return spec


def with_cgroup_mount(spec: dict[str, Any]) -> dict[str, Any]:
    """The container's own cgroup, read-only at /sys/fs/cgroup, as Docker gives it: lets
    a process read its limits."""
    spec.setdefault("mounts", []).append(
        _mount("/sys/fs/cgroup", "cgroup", "cgroup", "ro", "nosuid", "noexec", "nodev"))
    return spec


def with_host_network(spec: dict[str, Any]) -> dict[str, Any]:
    linux = spec.setdefault("linux", {})
    linux["namespaces"] = [n for n in linux.get("namespaces", []) if n["type"] != "network"]
    taken = ("/etc/hosts", "/etc/resolv.conf")
    spec["mounts"] = [m for m in spec.get("mounts", []) if m["destination"] not in taken]
    for path in taken:
        if os.path.exists(path):
            spec["mounts"].append(_mount(path, "bind", path, "rbind", "ro"))
    return spec


def with_readonly_rootfs(spec: dict[str, Any]) -> dict[str, Any]:
    spec.setdefault("root", {})["readonly"] = True
    return spec


def with_tty(spec: dict[str, Any]) -> dict[str, Any]:
    spec.setdefault("process", {})["terminal"] = True
    return with_env(spec, ["TERM=xterm"])


def dumps(spec: Mapping[str, Any]) -> bytes:
    return json.dumps(spec, separators=(",", ":")).encode()
