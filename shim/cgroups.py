"""Finding a process's cgroup, watching it for OOM kills, and shaping its statistics."""
from __future__ import annotations

import ctypes
import os
import selectors
import threading
from collections.abc import Callable
from typing import Any

from google.protobuf.message import Message

from ctrd.shim.log import Logger

ROOT = "/sys/fs/cgroup"


def unified() -> bool:
    return os.path.exists(os.path.join(ROOT, "cgroup.controllers"))


def memory_cgroup(pid: int) -> str | None:
    """The directory of ``pid``'s memory cgroup (v1 memory controller, or v2)."""
    try:
        with open(f"/proc/{pid}/cgroup") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    v2 = unified()
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if v2 and controllers == "":
            return os.path.join(ROOT, path.lstrip("/"))
        if not v2 and "memory" in controllers.split(","):
            return os.path.join(ROOT, "memory", path.lstrip("/"))
    return None


class OOMWatcher:
    """Waits for every watched container's OOM notification on the shim's main loop.

    v1: an eventfd registered on memory.oom_control through cgroup.event_control.
    v2: inotify on memory.events, reporting when its oom_kill counter grows.

    Watches are added and removed from request threads while the main thread waits
    in the selector; epoll allows that, and a notification for an fd that was
    removed meanwhile (or whose number was reused) is dropped by the lookup in
    ``_fired``.
    """

    def __init__(self, on_oom: Callable[[str], None], log: Logger,
                 selector: selectors.BaseSelector) -> None:
        self._on_oom = on_oom
        self._log = log
        self._selector = selector
        self._lock = threading.Lock()
        self._watches: dict[int, tuple[str, str]] = {}  # fd -> (container id, cgroup dir)
        self._oom_kills: dict[str, int] = {}

    def add(self, container_id: str, pid: int) -> None:
        cg = memory_cgroup(pid)
        if cg is None or not os.path.isdir(cg):
            self._log.warning("oom_watch_skipped", id=container_id, reason="no memory cgroup")
            return
        try:
            fd = self._watch_v2(cg) if unified() else self._watch_v1(cg)
        except OSError as exc:
            self._log.warning("oom_watch_failed", id=container_id, error=str(exc))
            return
        with self._lock:
            self._watches[fd] = (container_id, cg)
            self._selector.register(fd, selectors.EVENT_READ, self._fired)

    def remove(self, container_id: str) -> None:
        with self._lock:
            for fd, (cid, _) in list(self._watches.items()):
                if cid == container_id:
                    del self._watches[fd]
                    self._selector.unregister(fd)
                    os.close(fd)

    def _watch_v1(self, cg: str) -> int:
        efd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        try:
            ctl = os.open(os.path.join(cg, "memory.oom_control"), os.O_RDONLY | os.O_CLOEXEC)
            try:
                with open(os.path.join(cg, "cgroup.event_control"), "w") as f:
                    f.write(f"{efd} {ctl}")
            finally:
                os.close(ctl)
        except OSError:
            os.close(efd)
            raise
        return efd

    def _watch_v2(self, cg: str) -> int:
        libc = ctypes.CDLL(None, use_errno=True)
        fd = libc.inotify_init1(os.O_CLOEXEC | os.O_NONBLOCK)
        if fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1")
        in_modify = 0x2
        if libc.inotify_add_watch(fd, os.path.join(cg, "memory.events").encode(), in_modify) < 0:
            err = ctypes.get_errno()
            os.close(fd)
            raise OSError(err, "inotify_add_watch memory.events")
        self._oom_kills[cg] = _oom_kill_count(cg)
        return fd

    def _fired(self, fd: int) -> None:
        with self._lock:
            watch = self._watches.get(fd)
            if watch is None:
                return
            try:
                os.read(fd, 4096)
            except OSError:
                pass
        container_id, cg = watch
        if not os.path.isdir(cg):  # the cgroup went away, which also signals the eventfd
            self.remove(container_id)
            return
        if unified():
            count = _oom_kill_count(cg)
            if count <= self._oom_kills.get(cg, 0):
                return
            self._oom_kills[cg] = count
        self._on_oom(container_id)


def _oom_kill_count(cg: str) -> int:
    try:
        with open(os.path.join(cg, "memory.events")) as f:
            for line in f:
                key, _, value = line.partition(" ")
                if key == "oom_kill":
                    return int(value)
    except OSError:
        pass
    return 0


def metrics(stats: dict[str, Any], v2: bool) -> Message:
    """runc's ``events --stats`` data as containerd's cgroups Metrics message."""
    if v2:
        return _metrics_v2(stats)
    return _metrics_v1(stats)


def _metrics_v1(s: dict[str, Any]) -> Message:
    from ctrd.api.cgroups.v1 import metrics_pb2 as m

    cpu, mem, pids = s.get("cpu", {}), s.get("memory", {}), s.get("pids", {})
    usage, thr = cpu.get("usage", {}), cpu.get("throttling", {})
    raw = mem.get("raw", {}) or {}
    out = m.Metrics(
        pids=m.PidsStat(current=pids.get("current", 0), limit=pids.get("limit", 0)),
        cpu=m.CPUStat(
            usage=m.CPUUsage(total=usage.get("total", 0), kernel=usage.get("kernel", 0),
                             user=usage.get("user", 0), per_cpu=usage.get("percpu", []) or []),
            throttling=m.Throttle(periods=thr.get("periods", 0),
                                  throttled_periods=thr.get("throttledPeriods", 0),
                                  throttled_time=thr.get("throttledTime", 0))),
    )
    ms = out.memory
    for field in ms.DESCRIPTOR.fields:
        key = field.name.replace("pg_pg_", "pgpg").replace("pg_maj_", "pgmaj").replace("pg_fault", "pgfault")
        if field.type == field.TYPE_UINT64 and key in raw:
            setattr(ms, field.name, raw[key])
    ms.cache = mem.get("cache", raw.get("cache", 0))
    for name, key in (("usage", "usage"), ("swap", "swap"), ("kernel", "kernel"),
                      ("kernel_tcp", "kernelTCP")):
        e = mem.get(key, {}) or {}
        getattr(ms, name).CopyFrom(m.MemoryEntry(limit=e.get("limit", 0), usage=e.get("usage", 0),
                                                 max=e.get("max", 0), failcnt=e.get("failcnt", 0)))
    blk = s.get("blkio", {}) or {}
    for field, key in (("io_service_bytes_recursive", "ioServiceBytesRecursive"),
                       ("io_serviced_recursive", "ioServicedRecursive"),
                       ("io_queued_recursive", "ioQueueRecursive"),
                       ("io_service_time_recursive", "ioServiceTimeRecursive"),
                       ("io_wait_time_recursive", "ioWaitTimeRecursive"),
                       ("io_merged_recursive", "ioMergedRecursive"),
                       ("io_time_recursive", "ioTimeRecursive"),
                       ("sectors_recursive", "sectorsRecursive")):
        for e in blk.get(key) or []:
            getattr(out.blkio, field).add(op=e.get("op", ""), major=e.get("major", 0),
                                          minor=e.get("minor", 0), value=e.get("value", 0))
    for size, h in sorted((s.get("hugetlb") or {}).items()):
        out.hugetlb.add(pagesize=size, usage=h.get("usage", 0), max=h.get("max", 0),
                        failcnt=h.get("failcnt", 0))
    return out


def _metrics_v2(s: dict[str, Any]) -> Message:
    from ctrd.api.cgroups.v2 import metrics_pb2 as m

    cpu, mem, pids = s.get("cpu", {}), s.get("memory", {}), s.get("pids", {})
    usage, thr = cpu.get("usage", {}), cpu.get("throttling", {})
    raw = mem.get("raw", {}) or {}
    out = m.Metrics(
        pids=m.PidsStat(current=pids.get("current", 0), limit=pids.get("limit", 0)),
        cpu=m.CPUStat(usage_usec=usage.get("total", 0) // 1000,
                      user_usec=usage.get("user", 0) // 1000,
                      system_usec=usage.get("kernel", 0) // 1000,
                      nr_periods=thr.get("periods", 0),
                      nr_throttled=thr.get("throttledPeriods", 0),
                      throttled_usec=thr.get("throttledTime", 0) // 1000),
    )
    ms = out.memory
    for field in ms.DESCRIPTOR.fields:
        if field.name in raw:
            setattr(ms, field.name, raw[field.name])
    u, sw = mem.get("usage", {}) or {}, mem.get("swap", {}) or {}
    ms.usage, ms.usage_limit = u.get("usage", 0), u.get("limit", 0)
    ms.swap_usage, ms.swap_limit = sw.get("usage", 0), sw.get("limit", 0)
    return out
