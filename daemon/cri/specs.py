"""OCI specs for pod sandboxes and their containers, on top of :mod:`ctrd.oci.spec`.

A sandbox's process (the pause image's) holds the pod's namespaces: network (the
CNI-configured netns), IPC and UTS, and PID when the pod shares one. Containers
join those by path (``/proc/<sandbox pid>/ns/...``), so they see the pod's network
and hostname. Annotations tell the runtime which is which, with containerd's names.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ctrd.errors import InvalidArgument, NotFound
from ctrd.oci import spec as oci

from .records import ContainerConfig, Mount, NamespaceMode, Resources, Sandbox, SandboxConfig

CONTAINER_TYPE = "io.kubernetes.cri.container-type"
SANDBOX_ID = "io.kubernetes.cri.sandbox-id"
SANDBOX_NAME = "io.kubernetes.cri.sandbox-name"
SANDBOX_NAMESPACE = "io.kubernetes.cri.sandbox-namespace"
SANDBOX_UID = "io.kubernetes.cri.sandbox-uid"
SANDBOX_LOG_DIR = "io.kubernetes.cri.sandbox-log-directory"
CONTAINER_NAME = "io.kubernetes.cri.container-name"
IMAGE_NAME = "io.kubernetes.cri.image-name"

# Where a pod's shared files (hostname, hosts, resolv.conf) appear in its containers.
POD_FILES = ("/etc/hostname", "/etc/hosts", "/etc/resolv.conf")
_PROPAGATION = {0: "rprivate", 1: "rslave", 2: "rshared"}
_CAP_PREFIX = "CAP_"
SANDBOX_OOM_SCORE_ADJ = -998


def cgroup_path(parent: str, id_: str, namespace: str) -> str:
    return f"{parent.rstrip('/')}/{id_}" if parent else f"/{namespace}/{id_}"


def sandbox_spec(sandbox: Sandbox, image_config: dict[str, Any], files: Path,
                 namespace: str, oom_floor: int | None = None) -> dict[str, Any]:
    """``oom_floor``: the lowest oom_score_adj allowed (restrict_oom_score_adj), if any."""
    config = sandbox.config
    spec = oci.default_spec(namespace, sandbox.id, seccomp=False)
    oci.with_image_config(spec, image_config)
    with_seccomp(spec, config.seccomp)
    # The pause process is the last thing the OOM killer should pick, as in containerd.
    spec["process"]["oomScoreAdj"] = _restrict(SANDBOX_OOM_SCORE_ADJ, oom_floor)
    spec["hostname"] = config.hostname
    _namespaces(spec, config.network, sandbox.netns_path, config.ipc, config.pid)
    spec["linux"]["cgroupsPath"] = cgroup_path(config.cgroup_parent, sandbox.id, namespace)
    if config.sysctls:
        spec["linux"]["sysctl"] = dict(config.sysctls)
    # The pause process needs nothing of the image's filesystem to be writable.
    oci.with_readonly_rootfs(spec)
    _pod_files(spec, files, config)
    spec["annotations"] = {
        **config.annotations,
        CONTAINER_TYPE: "sandbox", SANDBOX_ID: sandbox.id, SANDBOX_NAME: config.name,
        SANDBOX_NAMESPACE: config.namespace, SANDBOX_UID: config.uid,
        SANDBOX_LOG_DIR: config.log_directory,
    }
    return spec


def container_spec(id_: str, config: ContainerConfig, sandbox: Sandbox,
                   image_config: dict[str, Any], image_name: str, rootfs: Path | None,
                   files: Path, namespace: str, oom_floor: int | None = None) -> dict[str, Any]:
    spec = oci.default_spec(namespace, id_, seccomp=False)
    # CRI's command replaces the image's Entrypoint (and then its Cmd goes too); its args
    # replace Cmd.
    if config.command:
        oci.with_image_config(spec, image_config, config.args, rootfs,
                              entrypoint=config.command)
        spec["process"]["args"] = [*config.command, *config.args]
    else:
        oci.with_image_config(spec, image_config, config.args, rootfs)
    if not spec["process"]["args"]:
        raise InvalidArgument(f"no command specified for container {config.name!r}")
    if config.working_dir:
        oci.with_cwd(spec, config.working_dir)
    oci.with_env(spec, [f"{k}={v}" for k, v in config.envs])
    _user(spec, config, rootfs)
    if config.tty:
        oci.with_tty(spec)
    if config.readonly_rootfs:
        oci.with_readonly_rootfs(spec)
    _capabilities(spec, config)
    spec["process"]["noNewPrivileges"] = config.no_new_privs
    pod = sandbox.config
    _join_pod(spec, sandbox, config.pid)
    spec["hostname"] = pod.hostname
    spec["linux"]["cgroupsPath"] = cgroup_path(pod.cgroup_parent, id_, namespace)
    with_resources(spec, config.resources, oom_floor)
    _pod_files(spec, files, pod, taken={m.container_path for m in config.mounts})
    for mount in config.mounts:
        spec["mounts"].append(_bind(mount))
    # After the capabilities: the default profile allows the syscalls they grant.
    with_seccomp(spec, config.seccomp)
    if config.privileged:
        _privileged(spec)
    spec["annotations"] = {
        **config.annotations,
        CONTAINER_TYPE: "container", SANDBOX_ID: sandbox.id, SANDBOX_NAME: pod.name,
        SANDBOX_NAMESPACE: pod.namespace, SANDBOX_UID: pod.uid,
        CONTAINER_NAME: config.name, IMAGE_NAME: image_name,
    }
    return spec


def with_seccomp(spec: dict[str, Any], profile: str) -> None:
    """CRI's seccomp choice. Unset means unconfined, as kubelet and containerd take it
    (kubelet asks for runtime/default when the pod or its SeccompDefault wants it)."""
    if profile in ("", "unconfined"):
        spec["linux"].pop("seccomp", None)
    elif profile in ("runtime/default", "docker/default"):
        oci.with_default_seccomp(spec)
    elif profile.startswith("localhost/"):
        spec["linux"]["seccomp"] = _local_profile(profile.removeprefix("localhost/"))
    else:
        raise InvalidArgument(f"unknown seccomp profile {profile!r}")


def _local_profile(path: str) -> dict[str, Any]:
    if not path.startswith("/"):
        raise InvalidArgument(f"seccomp profile path {path!r} must be absolute")
    try:
        with open(path, "rb") as f:
            profile = json.loads(f.read(1 << 20))
    except FileNotFoundError:
        raise NotFound(f"seccomp profile {path} not found") from None
    except (OSError, ValueError) as exc:
        raise InvalidArgument(f"seccomp profile {path}: {exc}") from None
    if not isinstance(profile, dict) or "defaultAction" not in profile:
        raise InvalidArgument(f"seccomp profile {path} has no defaultAction")
    return profile


def exec_process(container_process: dict[str, Any], cmd: list[str]) -> dict[str, Any]:
    """The process of an exec: the container's own, with another command and no tty."""
    if not cmd:
        raise InvalidArgument("cmd must not be empty")
    process = dict(container_process)
    process["args"] = list(cmd)
    process["terminal"] = False
    return process


def _namespaces(spec: dict[str, Any], network: NamespaceMode, netns_path: str,
                ipc: NamespaceMode, pid: NamespaceMode) -> None:
    namespaces = []
    for entry in spec["linux"]["namespaces"]:
        kind = entry["type"]
        if kind == "network":
            if network == NamespaceMode.NODE:
                continue
            entry = {"type": kind, "path": netns_path} if netns_path else entry
        elif (kind == "ipc" and ipc == NamespaceMode.NODE
              or kind == "pid" and pid == NamespaceMode.NODE):
            continue
        namespaces.append(entry)
    spec["linux"]["namespaces"] = namespaces
    if network == NamespaceMode.NODE:
        spec["mounts"] = [m for m in spec["mounts"] if m["destination"] not in POD_FILES]


def _join_pod(spec: dict[str, Any], sandbox: Sandbox, pid_mode: NamespaceMode) -> None:
    """Join the sandbox process's network, IPC, UTS (and PID, for a shared one)."""
    pod = sandbox.config
    proc = f"/proc/{sandbox.pid}/ns"
    joined = {"network": "net", "ipc": "ipc", "uts": "uts"}
    if pid_mode == NamespaceMode.POD or (pid_mode == NamespaceMode.CONTAINER
                                         and pod.pid == NamespaceMode.POD):
        joined["pid"] = "pid"
    namespaces = []
    for entry in spec["linux"]["namespaces"]:
        kind = entry["type"]
        if (kind == "network" and pod.network == NamespaceMode.NODE) or \
                (kind == "ipc" and pod.ipc == NamespaceMode.NODE) or \
                (kind == "pid" and (pid_mode == NamespaceMode.NODE
                                    or pod.pid == NamespaceMode.NODE)):
            continue
        if kind in joined:
            entry = {"type": kind, "path": f"{proc}/{joined[kind]}"}
        namespaces.append(entry)
    spec["linux"]["namespaces"] = namespaces


def _pod_files(spec: dict[str, Any], files: Path, pod: SandboxConfig,
               taken: frozenset[str] | set[str] = frozenset()) -> None:
    if pod.network == NamespaceMode.NODE:
        oci.with_host_network(spec)
        return
    for dest in POD_FILES:
        if dest not in taken:
            spec["mounts"].append({"destination": dest, "type": "bind",
                                   "source": str(files / Path(dest).name),
                                   "options": ["rbind", "rprivate", "rw"]})


def _bind(mount: Mount) -> dict[str, Any]:
    if not mount.container_path.startswith("/"):
        raise InvalidArgument(f"mount destination {mount.container_path!r} must be absolute")
    if not mount.host_path:
        raise InvalidArgument(f"mount {mount.container_path!r} has no host path")
    propagation = _PROPAGATION.get(mount.propagation)
    if propagation is None:
        raise InvalidArgument(f"unknown mount propagation {mount.propagation}")
    options = ["rbind", propagation, "ro" if mount.readonly else "rw"]
    return {"destination": mount.container_path, "type": "bind",
            "source": mount.host_path, "options": options}


def _user(spec: dict[str, Any], config: ContainerConfig, rootfs: Path | None) -> None:
    if config.run_as_username:
        user = config.run_as_username
    elif config.run_as_user is not None:
        user = str(config.run_as_user)
    else:
        return  # the image's user stays
    if config.run_as_group is not None:
        user = f"{user}:{config.run_as_group}"
    oci.with_user(spec, user, rootfs)
    oci.with_additional_gids(spec, user.split(":")[0], rootfs)


def _capabilities(spec: dict[str, Any], config: ContainerConfig) -> None:
    caps = spec["process"]["capabilities"]
    current = list(caps["bounding"])
    if any(c.upper() == "ALL" for c in config.drop_capabilities):
        current = []
    for cap in config.drop_capabilities:
        name = _cap(cap)
        current = [c for c in current if c != name]
    for cap in config.add_capabilities:
        name = _cap(cap)
        if name == "CAP_ALL":
            raise InvalidArgument("adding ALL capabilities is for privileged containers")
        if name not in current:
            current.append(name)
    for key in ("bounding", "permitted", "effective"):
        caps[key] = list(current)


def _cap(name: str) -> str:
    upper = name.upper()
    if not upper.replace("_", "").isalnum():
        raise InvalidArgument(f"invalid capability {name!r}")
    return upper if upper.startswith(_CAP_PREFIX) else _CAP_PREFIX + upper


def with_resources(spec: dict[str, Any], res: Resources, oom_floor: int | None = None) -> None:
    """Set the CPU and memory limits of ``res`` that are given (non-zero)."""
    linux = spec["linux"]["resources"]
    cpu: dict[str, Any] = {}
    if res.cpu_period:
        cpu["period"] = res.cpu_period
    if res.cpu_quota:
        cpu["quota"] = res.cpu_quota
    if res.cpu_shares:
        cpu["shares"] = res.cpu_shares
    if res.cpuset_cpus:
        cpu["cpus"] = res.cpuset_cpus
    if res.cpuset_mems:
        cpu["mems"] = res.cpuset_mems
    if cpu:
        linux["cpu"] = cpu
    if res.memory_limit < 0:
        raise InvalidArgument(f"memory limit {res.memory_limit} is negative")
    if res.memory_limit:
        linux["memory"] = {"limit": res.memory_limit}
    if res.oom_score_adj:
        if not -1000 <= res.oom_score_adj <= 1000:
            raise InvalidArgument(f"oom_score_adj {res.oom_score_adj} is outside -1000..1000")
        spec["process"]["oomScoreAdj"] = _restrict(res.oom_score_adj, oom_floor)


def _restrict(score: int, floor: int | None) -> int:
    # Lowering a score below one's own needs CAP_SYS_RESOURCE, which some hosts withhold.
    return score if floor is None else max(score, floor)


def _privileged(spec: dict[str, Any]) -> None:
    """What a privileged container gets: every capability, no seccomp, nothing masked,
    /sys writable, all devices allowed."""
    caps = spec["process"]["capabilities"]
    everything = sorted(set(caps["bounding"]) | set(_ALL_CAPS))
    for key in ("bounding", "permitted", "effective"):
        caps[key] = list(everything)
    linux = spec["linux"]
    linux.pop("seccomp", None)
    linux["maskedPaths"] = []
    linux["readonlyPaths"] = []
    linux["resources"]["devices"] = [{"allow": True, "access": "rwm"}]
    for mount in spec["mounts"]:
        if mount["destination"] == "/sys":
            mount["options"] = [o for o in mount["options"] if o != "ro"] + ["rw"]


_ALL_CAPS = (
    "CAP_AUDIT_CONTROL", "CAP_AUDIT_READ", "CAP_AUDIT_WRITE", "CAP_BLOCK_SUSPEND", "CAP_BPF",
    "CAP_CHECKPOINT_RESTORE", "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_DAC_READ_SEARCH",
    "CAP_FOWNER", "CAP_FSETID", "CAP_IPC_LOCK", "CAP_IPC_OWNER", "CAP_KILL", "CAP_LEASE",
    "CAP_LINUX_IMMUTABLE", "CAP_MAC_ADMIN", "CAP_MAC_OVERRIDE", "CAP_MKNOD", "CAP_NET_ADMIN",
    "CAP_NET_BIND_SERVICE", "CAP_NET_BROADCAST", "CAP_NET_RAW", "CAP_PERFMON", "CAP_SETFCAP",
    "CAP_SETGID", "CAP_SETPCAP", "CAP_SETUID", "CAP_SYSLOG", "CAP_SYS_ADMIN", "CAP_SYS_BOOT",
    "CAP_SYS_CHROOT", "CAP_SYS_MODULE", "CAP_SYS_NICE", "CAP_SYS_PACCT", "CAP_SYS_PTRACE",
    "CAP_SYS_RAWIO", "CAP_SYS_RESOURCE", "CAP_SYS_TIME", "CAP_SYS_TTY_CONFIG",
    "CAP_WAKE_ALARM",
)
