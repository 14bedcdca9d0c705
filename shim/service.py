"""The containerd.task.v2.Task service: what the daemon asks of a shim.

Locking: ``_lock`` guards the container table and the table of exits nobody has
claimed yet; ``_event_lock`` orders events, so that a task's exit is never
published before its start. Exits arrive from the reaper (main thread) and are
handled on a thread of their own, because handling one may need to run runc,
whose own exit the main thread must be free to reap.
"""
from __future__ import annotations

import json
import os
import queue
import selectors
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from google.protobuf import empty_pb2

from ctrd import __version__, errors
from ctrd.api.containerd.events import task_pb2 as ev
from ctrd.api.containerd.runc.options import oci_pb2
from ctrd.api.containerd.runtime.task.v2 import shim_pb2 as api
from ctrd.api.containerd.types.task import task_pb2 as types
from ctrd.shim import cgroups
from ctrd.shim.events import Publisher, pack_any, timestamp
from ctrd.shim.log import Logger
from ctrd.shim.mount import Mount, mount, unmount_all
from ctrd.shim.process import Exec, Init, IOOptions, Process
from ctrd.shim.reaper import Exit, Reaper
from ctrd.shim.runc import DEFAULT_ROOT, Runc, which
from ctrd.shim.stdio import Stdio
from ctrd.ttrpc.codec import CallContext

EMPTY = empty_pb2.Empty()
OPTIONS_FILE = "options.json"
RUNTIME_FILE = "runtime"
UNCLAIMED_TTL = 60.0
STATUS = {
    "created": types.CREATED, "running": types.RUNNING, "stopped": types.STOPPED,
    "paused": types.PAUSED, "pausing": types.PAUSING,
}


@dataclass
class Container:
    id: str
    bundle: str
    init: Init
    execs: dict[str, Exec] = field(default_factory=dict)
    reserved: set[str] = field(default_factory=set)

    def process(self, exec_id: str) -> Process:
        if not exec_id:
            return self.init
        p = self.execs.get(exec_id)
        if p is None:
            raise errors.NotFound(f"process does not exist {exec_id}")
        return p


def read_options(any_msg: object) -> oci_pb2.Options:
    opts = oci_pb2.Options()
    type_url = getattr(any_msg, "type_url", "")
    if type_url.rsplit("/", 1)[-1] == opts.DESCRIPTOR.full_name:
        opts.ParseFromString(any_msg.value)  # type: ignore[attr-defined]
    return opts


def write_bundle_options(bundle: str, opts: oci_pb2.Options) -> None:
    """What ``delete`` needs to find the container again once the shim is gone."""
    data = {"BinaryName": opts.binary_name, "Root": opts.root,
            "SystemdCgroup": opts.systemd_cgroup}
    with open(os.path.join(bundle, OPTIONS_FILE), "w") as f:
        json.dump(data, f)
    with open(os.path.join(bundle, RUNTIME_FILE), "w") as f:
        f.write(opts.binary_name)


def kills_all_on_exit(bundle: str) -> bool:
    """Without a pid namespace of its own, a container's other processes outlive
    its init; they must be killed when init exits."""
    try:
        with open(os.path.join(bundle, "config.json")) as f:
            spec = json.load(f)
    except (OSError, ValueError):
        return True
    for ns in (spec.get("linux") or {}).get("namespaces") or []:
        if ns.get("type") == "pid" and not ns.get("path"):
            return False
    return True


class TaskService:
    def __init__(self, namespace: str, publisher: Publisher, log: Logger,
                 request_shutdown: Callable[[], None], selector: selectors.BaseSelector) -> None:
        self.namespace = namespace
        self.publisher = publisher
        self.log = log
        self.reaper = Reaper(self._on_exit)
        self._request_shutdown = request_shutdown
        self._lock = threading.Lock()
        self._event_lock = threading.Lock()
        self._containers: dict[str, Container] = {}
        self._unclaimed: dict[int, Exit] = {}
        self._exits: queue.Queue[Exit] = queue.Queue()
        self._selector = selector
        self._oom = cgroups.OOMWatcher(self._on_oom, log, selector)
        threading.Thread(target=self._process_exits, name="exits", daemon=True).start()

    # --- helpers ----------------------------------------------------------------

    def _container(self, id: str) -> Container:
        with self._lock:
            c = self._containers.get(id)
        if c is None:
            raise errors.NotFound("container not created")
        return c

    def _publish(self, event: object) -> None:
        self.publisher.publish(event)  # type: ignore[arg-type]

    def _on_exit(self, exit: Exit) -> None:
        self._exits.put(exit)

    def _on_oom(self, container_id: str) -> None:
        self.log.info("oom", id=container_id)
        self._publish(ev.TaskOOM(container_id=container_id))

    def _claim_early_exit(self, pid: int) -> None:
        """Re-deliver an exit reaped before we learnt whose pid it was."""
        with self._lock:
            exit = self._unclaimed.pop(pid, None)
        if exit is not None:
            self._exits.put(exit)

    def _process_exits(self) -> None:
        while True:
            exit = self._exits.get()
            with self._lock:
                found: tuple[Container, Process] | None = None
                for c in self._containers.values():
                    for p in (c.init, *c.execs.values()):
                        if p.pid == exit.pid and not p.has_exited:
                            found = (c, p)
                            break
                    if found:
                        break
                if found is None:
                    now = time.time()
                    self._unclaimed = {pid: e for pid, e in self._unclaimed.items()
                                       if now - e.timestamp < UNCLAIMED_TTL}
                    self._unclaimed[exit.pid] = exit
                    continue
            container, process = found
            if process is container.init and kills_all_on_exit(container.bundle):
                container.init.kill_all()
            process.set_exited(exit.status, exit.timestamp)
            self.log.info("process_exited", id=container.id, exec_id=process.id, pid=exit.pid,
                          status=exit.status)
            with self._event_lock:
                self._publish(ev.TaskExit(
                    container_id=container.id, id=process.id, pid=exit.pid,
                    exit_status=exit.status, exited_at=timestamp(exit.timestamp)))

    def has_containers(self) -> bool:
        with self._lock:
            return bool(self._containers)

    # --- Task service ------------------------------------------------------------

    def Create(self, ctx: CallContext, r: api.CreateTaskRequest) -> api.CreateTaskResponse:
        if r.checkpoint:
            raise errors.Unimplemented("restoring a checkpoint is not supported by this shim")
        with self._lock:
            if r.id in self._containers:
                raise errors.AlreadyExists(f"container {r.id} already exists")
        opts = read_options(r.options) if r.HasField("options") else oci_pb2.Options()
        write_bundle_options(r.bundle, opts)
        log = self.log.bind(id=r.id)
        rootfs = ""
        if r.rootfs:
            rootfs = os.path.join(r.bundle, "rootfs")
            os.makedirs(rootfs, mode=0o711, exist_ok=True)
        try:
            for m in r.rootfs:
                mount(Mount(m.type, m.source, tuple(m.options)), rootfs)
            runc = Runc(self.reaper, opts.binary_name or "runc",
                        os.path.join(opts.root or DEFAULT_ROOT, self.namespace),
                        os.path.join(r.bundle, "log.json"), opts.systemd_cgroup)
            init = Init(r.id, r.bundle, runc,
                        Stdio(r.stdin, r.stdout, r.stderr, r.terminal), rootfs, log,
                        IOOptions(opts.io_uid, opts.io_gid, self._selector), opts.no_pivot_root,
                        opts.no_new_keyring)
            init.create()
        except BaseException:
            try:
                unmount_all(rootfs)
            except OSError as exc:
                log.warning("rootfs_unmount_failed", error=str(exc))
            raise
        with self._lock:
            self._containers[r.id] = Container(r.id, r.bundle, init)
        log.info("created", pid=init.pid)
        with self._event_lock:
            self._publish(ev.TaskCreate(
                container_id=r.id, bundle=r.bundle, rootfs=r.rootfs,
                io=ev.TaskIO(stdin=r.stdin, stdout=r.stdout, stderr=r.stderr,
                             terminal=r.terminal),
                checkpoint=r.checkpoint, pid=init.pid))
        self._claim_early_exit(init.pid)
        return api.CreateTaskResponse(pid=init.pid)

    def Start(self, ctx: CallContext, r: api.StartRequest) -> api.StartResponse:
        c = self._container(r.id)
        p = c.process(r.exec_id)
        with self._event_lock:
            p.start()  # type: ignore[attr-defined]
            if r.exec_id:
                self._publish(ev.TaskExecStarted(container_id=c.id, exec_id=r.exec_id, pid=p.pid))
            else:
                self._oom.add(c.id, p.pid)
                self._publish(ev.TaskStart(container_id=c.id, pid=p.pid))
        self._claim_early_exit(p.pid)
        return api.StartResponse(pid=p.pid)

    def Delete(self, ctx: CallContext, r: api.DeleteRequest) -> api.DeleteResponse:
        c = self._container(r.id)
        p = c.process(r.exec_id)
        p.delete()  # type: ignore[attr-defined]
        if r.exec_id:
            with self._lock:
                c.execs.pop(r.exec_id, None)
        else:
            with self._lock:
                self._containers.pop(r.id, None)
            self._oom.remove(c.id)
            with self._event_lock:
                self._publish(ev.TaskDelete(
                    container_id=c.id, pid=p.pid, exit_status=p.exit_status,
                    exited_at=timestamp(p.exited_at or time.time())))
        return api.DeleteResponse(pid=p.pid, exit_status=p.exit_status,
                                  exited_at=timestamp(p.exited_at or time.time()))

    def Exec(self, ctx: CallContext, r: api.ExecProcessRequest) -> empty_pb2.Empty:
        c = self._container(r.id)
        with self._lock:
            if r.exec_id in c.execs or r.exec_id in c.reserved:
                raise errors.AlreadyExists(f"id {r.exec_id}")
            c.reserved.add(r.exec_id)
        try:
            process = c.init.exec(r.exec_id, Stdio(r.stdin, r.stdout, r.stderr, r.terminal),
                                  r.spec.value)
            with self._lock:
                c.execs[r.exec_id] = process
        finally:
            with self._lock:
                c.reserved.discard(r.exec_id)
        with self._event_lock:
            self._publish(ev.TaskExecAdded(container_id=c.id, exec_id=r.exec_id))
        return EMPTY

    def ResizePty(self, ctx: CallContext, r: api.ResizePtyRequest) -> empty_pb2.Empty:
        self._container(r.id).process(r.exec_id).resize(r.width, r.height)
        return EMPTY

    def State(self, ctx: CallContext, r: api.StateRequest) -> api.StateResponse:
        c = self._container(r.id)
        p = c.process(r.exec_id)
        resp = api.StateResponse(
            id=p.id, bundle=c.bundle, pid=p.pid, status=STATUS.get(p.status(), types.UNKNOWN),
            stdin=p.stdio.stdin, stdout=p.stdio.stdout, stderr=p.stdio.stderr,
            terminal=p.stdio.terminal, exit_status=p.exit_status, exec_id=r.exec_id)
        if p.exited_at is not None:
            resp.exited_at.CopyFrom(timestamp(p.exited_at))
        return resp

    def Pause(self, ctx: CallContext, r: api.PauseRequest) -> empty_pb2.Empty:
        c = self._container(r.id)
        c.init.pause()
        with self._event_lock:
            self._publish(ev.TaskPaused(container_id=c.id))
        return EMPTY

    def Resume(self, ctx: CallContext, r: api.ResumeRequest) -> empty_pb2.Empty:
        c = self._container(r.id)
        c.init.resume()
        with self._event_lock:
            self._publish(ev.TaskResumed(container_id=c.id))
        return EMPTY

    def Kill(self, ctx: CallContext, r: api.KillRequest) -> empty_pb2.Empty:
        self._container(r.id).process(r.exec_id).kill(r.signal, r.all)  # type: ignore[attr-defined]
        return EMPTY

    def Pids(self, ctx: CallContext, r: api.PidsRequest) -> api.PidsResponse:
        c = self._container(r.id)
        with self._lock:
            by_pid = {p.pid: p.id for p in c.execs.values() if p.pid}
        resp = api.PidsResponse()
        for pid in c.init.runc.ps(c.id):
            info = resp.processes.add(pid=pid)
            if pid in by_pid:
                info.info.CopyFrom(pack_any(oci_pb2.ProcessDetails(exec_id=by_pid[pid])))
        return resp

    def CloseIO(self, ctx: CallContext, r: api.CloseIORequest) -> empty_pb2.Empty:
        p = self._container(r.id).process(r.exec_id)
        if r.stdin:
            p.close_stdin()
        return EMPTY

    def Checkpoint(self, ctx: CallContext, r: api.CheckpointTaskRequest) -> empty_pb2.Empty:
        c = self._container(r.id)
        if which("criu") is None:
            raise errors.Unimplemented("checkpoint needs criu, which is not installed")
        opts = oci_pb2.CheckpointOptions()
        if r.HasField("options") and r.options.type_url.endswith(opts.DESCRIPTOR.full_name):
            opts.ParseFromString(r.options.value)
        flags = []
        for enabled, flag in ((opts.open_tcp, "--tcp-established"),
                              (opts.external_unix_sockets, "--ext-unix-sk"),
                              (opts.terminal, "--shell-job"), (opts.file_locks, "--file-locks")):
            if enabled:
                flags.append(flag)
        if opts.cgroups_mode:
            flags += ["--manage-cgroups-mode", opts.cgroups_mode]
        for ns in opts.empty_namespaces:
            flags += ["--empty-ns", ns]
        work = opts.work_path or os.path.join(c.bundle, "criu-work")
        with c.init.lock:
            if c.init.state not in ("running", "paused"):
                raise errors.FailedPrecondition(f"cannot checkpoint a {c.init.state} process")
            c.init.runc.checkpoint(c.id, opts.image_path or r.path, work,
                                   leave_running=not opts.exit, options=flags)
        return EMPTY

    def Update(self, ctx: CallContext, r: api.UpdateTaskRequest) -> empty_pb2.Empty:
        self._container(r.id).init.update(r.resources.value)
        return EMPTY

    def Wait(self, ctx: CallContext, r: api.WaitRequest) -> api.WaitResponse:
        p = self._container(r.id).process(r.exec_id)
        p.wait()
        return api.WaitResponse(exit_status=p.exit_status,
                                exited_at=timestamp(p.exited_at or time.time()))

    def Stats(self, ctx: CallContext, r: api.StatsRequest) -> api.StatsResponse:
        c = self._container(r.id)
        stats = c.init.runc.stats(c.id)
        return api.StatsResponse(stats=pack_any(cgroups.metrics(stats, cgroups.unified())))

    def Connect(self, ctx: CallContext, r: api.ConnectRequest) -> api.ConnectResponse:
        with self._lock:
            c = self._containers.get(r.id)
        return api.ConnectResponse(shim_pid=os.getpid(), task_pid=c.init.pid if c else 0,
                                   version=__version__)

    def Shutdown(self, ctx: CallContext, r: api.ShutdownRequest) -> empty_pb2.Empty:
        if not self.has_containers():
            self._request_shutdown()
        return EMPTY
