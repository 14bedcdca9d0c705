"""What the CRI plugin knows of a pod sandbox or container, as plain records.

The gRPC layer turns CRI's protobuf configs into these; the core never sees protobuf.
They are saved as JSON in an extension of the containerd container record (where
containerd keeps its CRI metadata too), so they survive a daemon restart.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any, TypeVar

from ctrd.errors import InvalidArgument


class NamespaceMode(IntEnum):
    """CRI's NamespaceMode values."""

    POD = 0
    CONTAINER = 1
    NODE = 2
    TARGET = 3


class SandboxState(IntEnum):
    READY = 0
    NOTREADY = 1


class ContainerState(IntEnum):
    CREATED = 0
    RUNNING = 1
    EXITED = 2
    UNKNOWN = 3


@dataclass
class PortMapping:
    protocol: str = "tcp"  # tcp, udp or sctp, as CNI's portMappings capability wants
    container_port: int = 0
    host_port: int = 0
    host_ip: str = ""


@dataclass
class Mount:
    container_path: str
    host_path: str
    readonly: bool = False
    propagation: int = 0  # CRI's MountPropagation: private, host-to-container, bidirectional


@dataclass
class Resources:
    cpu_period: int = 0
    cpu_quota: int = 0
    cpu_shares: int = 0
    memory_limit: int = 0
    oom_score_adj: int = 0
    cpuset_cpus: str = ""
    cpuset_mems: str = ""


@dataclass
class SandboxConfig:
    name: str
    uid: str
    namespace: str
    attempt: int = 0
    hostname: str = ""
    log_directory: str = ""
    dns_servers: list[str] = field(default_factory=list)
    dns_searches: list[str] = field(default_factory=list)
    dns_options: list[str] = field(default_factory=list)
    port_mappings: list[PortMapping] = field(default_factory=list)
    labels: dict[str, str] = field(default_factory=dict)
    annotations: dict[str, str] = field(default_factory=dict)
    network: NamespaceMode = NamespaceMode.POD
    pid: NamespaceMode = NamespaceMode.CONTAINER
    ipc: NamespaceMode = NamespaceMode.POD
    cgroup_parent: str = ""
    sysctls: dict[str, str] = field(default_factory=dict)
    privileged: bool = False
    runtime_handler: str = ""
    seccomp: str = ""  # "", "unconfined", "runtime/default" or "localhost/<path>"


@dataclass
class ContainerConfig:
    name: str
    attempt: int = 0
    image: str = ""
    command: list[str] = field(default_factory=list)
    args: list[str] = field(default_factory=list)
    working_dir: str = ""
    envs: list[tuple[str, str]] = field(default_factory=list)
    mounts: list[Mount] = field(default_factory=list)
    labels: dict[str, str] = field(default_factory=dict)
    annotations: dict[str, str] = field(default_factory=dict)
    log_path: str = ""
    stdin: bool = False
    stdin_once: bool = False
    tty: bool = False
    resources: Resources = field(default_factory=Resources)
    privileged: bool = False
    run_as_user: int | None = None
    run_as_group: int | None = None
    run_as_username: str = ""
    readonly_rootfs: bool = False
    add_capabilities: list[str] = field(default_factory=list)
    drop_capabilities: list[str] = field(default_factory=list)
    no_new_privs: bool = False
    pid: NamespaceMode = NamespaceMode.CONTAINER
    seccomp: str = ""  # as SandboxConfig.seccomp


@dataclass
class Sandbox:
    id: str
    name: str  # unique: k8s_POD_<name>_<namespace>_<uid>_<attempt>
    config: SandboxConfig
    created_at: int = 0  # ns
    netns_path: str = ""
    ip: str = ""
    additional_ips: list[str] = field(default_factory=list)
    pid: int = 0
    state: SandboxState = SandboxState.NOTREADY


@dataclass
class ContainerStatus:
    state: ContainerState = ContainerState.CREATED
    pid: int = 0
    created_at: int = 0
    started_at: int = 0
    finished_at: int = 0
    exit_code: int = 0
    reason: str = ""
    message: str = ""


@dataclass
class Container:
    id: str
    name: str  # unique: k8s_<name>_<pod name>_<pod namespace>_<pod uid>_<attempt>
    sandbox_id: str
    config: ContainerConfig
    image_id: str  # the config digest of the image it was made from
    image_ref: str  # the reference the request named it by
    log_path: str = ""  # absolute: the sandbox's log directory joined with the config's
    status: ContainerStatus = field(default_factory=ContainerStatus)


T = TypeVar("T")


def dumps(record: Any) -> bytes:
    return json.dumps(dataclasses.asdict(record), separators=(",", ":")).encode()


def loads(cls: type[T], data: bytes) -> T:
    try:
        return _build(cls, json.loads(data))
    except (ValueError, TypeError, KeyError) as exc:
        raise InvalidArgument(f"corrupt {cls.__name__} record: {exc}") from None


def _build(cls: Any, value: Any) -> Any:
    """Rebuild a dataclass (and the dataclasses and enums in it) from its asdict form."""
    if not dataclasses.is_dataclass(cls):
        return value
    if not isinstance(value, dict):
        raise TypeError(f"{cls.__name__} must be a JSON object")
    kwargs = {}
    known = {f.name for f in dataclasses.fields(cls)}
    for name, raw in value.items():
        if name not in known:
            continue  # written by a newer version: ignore what this one does not know
        kwargs[name] = _convert(_TYPES.get((cls.__name__, name)), raw)
    return cls(**kwargs)


def _convert(kind: Any, raw: Any) -> Any:
    if kind is None or raw is None:
        return raw
    if isinstance(kind, list):
        return [_convert(kind[0], item) for item in raw]
    if kind is tuple:
        return tuple(raw)
    if isinstance(kind, type) and issubclass(kind, IntEnum):
        return kind(raw)
    return _build(kind, raw)


# Fields whose JSON form needs turning back into a richer type; the rest are plain.
_TYPES: dict[tuple[str, str], Any] = {
    ("SandboxConfig", "port_mappings"): [PortMapping],
    ("SandboxConfig", "network"): NamespaceMode,
    ("SandboxConfig", "pid"): NamespaceMode,
    ("SandboxConfig", "ipc"): NamespaceMode,
    ("ContainerConfig", "envs"): [tuple],
    ("ContainerConfig", "mounts"): [Mount],
    ("ContainerConfig", "resources"): Resources,
    ("ContainerConfig", "pid"): NamespaceMode,
    ("Sandbox", "config"): SandboxConfig,
    ("Sandbox", "state"): SandboxState,
    ("Container", "config"): ContainerConfig,
    ("Container", "status"): ContainerStatus,
    ("ContainerStatus", "state"): ContainerState,
}
