"""The default seccomp profile: allow by default, refuse what a container must not do.

A deny list rather than containerd's long allow list: it is short enough to read
and review, and new harmless syscalls keep working without a profile update. What
it refuses is what lets a process reach beyond its container: kernel modules and
keys, clocks, swap and reboot, other processes' memory, new namespaces and mounts,
kernel tracing. Some of these are given back when the process holds the capability
that governs them, as containerd's profile does.
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any

EPERM = 1

# Refused unless the process holds the capability named: containerd's profile grants
# the same syscalls with the same capabilities.
_BY_CAPABILITY: dict[str, tuple[str, ...]] = {
    "CAP_SYS_ADMIN": (
        "bpf", "fanotify_init", "fsconfig", "fsmount", "fsopen", "fspick",
        "lookup_dcookie", "mount", "mount_setattr", "move_mount", "name_to_handle_at",
        "open_tree", "perf_event_open", "quotactl", "quotactl_fd", "setdomainname",
        "sethostname", "setns", "syslog", "umount", "umount2", "unshare",
    ),
    "CAP_SYS_BOOT": ("reboot",),
    "CAP_SYS_CHROOT": (),
    "CAP_SYS_MODULE": ("delete_module", "init_module", "finit_module"),
    "CAP_SYS_PACCT": ("acct",),
    "CAP_SYS_PTRACE": ("kcmp", "pidfd_getfd", "process_madvise", "process_vm_readv",
                       "process_vm_writev", "ptrace"),
    "CAP_SYS_RAWIO": ("iopl", "ioperm"),
    "CAP_SYS_TIME": ("settimeofday", "stime", "clock_settime", "clock_settime64",
                     "adjtimex", "clock_adjtime", "clock_adjtime64"),
    "CAP_SYS_TTY_CONFIG": ("vhangup",),
    "CAP_SYS_NICE": ("get_mempolicy", "mbind", "set_mempolicy", "move_pages"),
}

# Refused whatever the capabilities: obsolete, or a way out of any container.
_ALWAYS = (
    "add_key", "create_module", "get_kernel_syms", "kexec_file_load", "kexec_load",
    "keyctl", "nfsservctl", "open_by_handle_at", "query_module", "request_key", "swapoff",
    "swapon", "_sysctl", "sysfs", "uselib", "userfaultfd", "ustat", "vm86", "vm86old",
)

_ARCHITECTURES = {
    "x86_64": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"],
    "aarch64": ["SCMP_ARCH_AARCH64", "SCMP_ARCH_ARM"],
}


def default_profile(capabilities: Iterable[str], machine: str) -> dict[str, Any]:
    """The profile (the ``linux.seccomp`` object of a runtime spec) for a process with
    these bounding capabilities on this machine (``uname -m``)."""
    held = set(capabilities)
    denied = list(_ALWAYS)
    for cap, names in _BY_CAPABILITY.items():
        if cap not in held:
            denied.extend(names)
    profile: dict[str, Any] = {
        "defaultAction": "SCMP_ACT_ALLOW",
        "syscalls": [{"names": sorted(set(denied)), "action": "SCMP_ACT_ERRNO",
                      "errnoRet": EPERM}],
    }
    if machine in _ARCHITECTURES:
        profile["architectures"] = _ARCHITECTURES[machine]
    return profile
