"""CPU and memory use of a container, as CRI reports it, from the shim's cgroup metrics.

The shim answers Stats with containerd's cgroups v1 or v2 Metrics message. CRI wants
the figures kubelet's eviction and ``kubectl top`` use: cumulative CPU time, and the
memory working set, which is usage minus the inactive file cache (the part the kernel
can drop at once), never below zero.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from google.protobuf import any_pb2

from ctrd.api.cgroups.v1 import metrics_pb2 as v1
from ctrd.api.cgroups.v2 import metrics_pb2 as v2
from ctrd.errors import InvalidArgument

_NO_LIMIT = 1 << 62  # larger than any real limit: v1 reports "unlimited" as ~2^63


@dataclass(frozen=True)
class Usage:
    timestamp: int  # ns
    cpu_ns: int
    memory_usage: int
    working_set: int
    rss: int
    page_faults: int
    major_page_faults: int
    available: int | None  # None without a memory limit
    processes: int = 0


@dataclass(frozen=True)
class Interface:
    name: str
    rx_bytes: int
    rx_errors: int
    tx_bytes: int
    tx_errors: int


@dataclass(frozen=True)
class PodUsage:
    """A pod's use: its pause process and every running container together."""

    total: Usage
    containers: dict[str, Usage]  # container id -> its use
    interfaces: list[Interface]


def total(usages: list[Usage]) -> Usage:
    """The sum of several cgroups' use (available memory is not additive: left out)."""
    return Usage(max((u.timestamp for u in usages), default=time.time_ns()),
                 sum(u.cpu_ns for u in usages), sum(u.memory_usage for u in usages),
                 sum(u.working_set for u in usages), sum(u.rss for u in usages),
                 sum(u.page_faults for u in usages), sum(u.major_page_faults for u in usages),
                 None, sum(u.processes for u in usages))


def interfaces(pid: int) -> list[Interface]:
    """The network interfaces counters of the namespace process ``pid`` is in (but lo)."""
    try:
        text = Path(f"/proc/{pid}/net/dev").read_text()
    except OSError:
        return []
    found = []
    for line in text.splitlines()[2:]:
        name, _, counters = line.partition(":")
        fields = counters.split()
        if name.strip() == "lo" or len(fields) < 11:
            continue
        found.append(Interface(name.strip(), int(fields[0]), int(fields[2]), int(fields[8]),
                               int(fields[10])))
    return found


def from_metrics(metrics: any_pb2.Any) -> Usage:
    name = metrics.type_url.rsplit("/", 1)[-1]
    now = time.time_ns()
    if name == v1.Metrics.DESCRIPTOR.full_name:
        m1 = v1.Metrics.FromString(metrics.value)
        mem = m1.memory
        usage = mem.usage.usage
        working = max(usage - mem.total_inactive_file, 0)
        limit = mem.usage.limit
        return Usage(now, m1.cpu.usage.total, usage, working, mem.total_rss,
                     mem.total_pg_fault, mem.total_pg_maj_fault,
                     max(limit - working, 0) if 0 < limit < _NO_LIMIT else None,
                     m1.pids.current)
    if name == v2.Metrics.DESCRIPTOR.full_name:
        m2 = v2.Metrics.FromString(metrics.value)
        mem2 = m2.memory
        working = max(mem2.usage - mem2.inactive_file, 0)
        limit = mem2.usage_limit
        return Usage(now, m2.cpu.usage_usec * 1000, mem2.usage, working, mem2.anon,
                     mem2.pgfault, mem2.pgmajfault,
                     max(limit - working, 0) if 0 < limit < _NO_LIMIT else None,
                     m2.pids.current)
    raise InvalidArgument(f"unknown metrics type {metrics.type_url!r}")
