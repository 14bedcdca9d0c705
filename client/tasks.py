"""containerd.services.tasks.v1: the running processes of containers."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ctrd.api.containerd.services.tasks.v1 import tasks_pb2 as pb
from ctrd.api.containerd.services.tasks.v1 import tasks_pb2_grpc as pb_grpc
from ctrd.api.containerd.types.task import task_pb2

from .connection import Connection
from .containers import PROCESS_TYPE_URL, pack_json
from .types import Mount, nanos


@dataclass(frozen=True)
class Process:
    container_id: str
    id: str  # the exec id, or the container id for a task's init process
    pid: int
    status: str  # created, running, stopped, paused, pausing, unknown
    stdin: str = ""
    stdout: str = ""
    stderr: str = ""
    terminal: bool = False
    exit_status: int = 0
    exited_at: int = 0

    @classmethod
    def from_pb(cls, msg: task_pb2.Process) -> Process:
        # Daemons fill in only ``id`` for a task's init process.
        return cls(msg.container_id or msg.id, msg.id, msg.pid,
                   task_pb2.Status.Name(msg.status).lower(), msg.stdin, msg.stdout,
                   msg.stderr, msg.terminal, msg.exit_status, nanos(msg.exited_at))


@dataclass(frozen=True)
class Exit:
    status: int
    exited_at: int = 0


@dataclass(frozen=True)
class Stdio:
    """Where a process's streams go: fifo paths, ``file://`` or ``binary://`` URIs."""

    stdin: str = ""
    stdout: str = ""
    stderr: str = ""
    terminal: bool = False


class Tasks:
    def __init__(self, conn: Connection) -> None:
        self._conn = conn
        self._stub = pb_grpc.TasksStub(conn.channel)

    async def create(self, container_id: str, stdio: Stdio = Stdio(),
                     rootfs: list[Mount] | None = None) -> int:
        req = pb.CreateTaskRequest(container_id=container_id, stdin=stdio.stdin,
                                   stdout=stdio.stdout, stderr=stdio.stderr,
                                   terminal=stdio.terminal,
                                   rootfs=[m.to_pb() for m in rootfs or []])
        return (await self._conn.unary(self._stub.Create, req)).pid

    async def start(self, container_id: str, exec_id: str = "") -> int:
        req = pb.StartRequest(container_id=container_id, exec_id=exec_id)
        return (await self._conn.unary(self._stub.Start, req)).pid

    async def get(self, container_id: str, exec_id: str = "") -> Process:
        req = pb.GetRequest(container_id=container_id, exec_id=exec_id)
        return Process.from_pb((await self._conn.unary(self._stub.Get, req)).process)

    async def list(self, filter: str = "") -> list[Process]:
        resp = await self._conn.unary(self._stub.List, pb.ListTasksRequest(filter=filter))
        return [Process.from_pb(t) for t in resp.tasks]

    async def kill(self, container_id: str, signal: int, *, exec_id: str = "",
                   all: bool = False) -> None:
        await self._conn.unary(self._stub.Kill, pb.KillRequest(
            container_id=container_id, exec_id=exec_id, signal=signal, all=all))

    async def wait(self, container_id: str, exec_id: str = "",
                   timeout: float | None = None) -> Exit:
        resp = await self._conn.unary(
            self._stub.Wait, pb.WaitRequest(container_id=container_id, exec_id=exec_id),
            timeout=timeout)
        return Exit(resp.exit_status, nanos(resp.exited_at))

    async def delete(self, container_id: str, exec_id: str = "") -> Exit:
        if exec_id:
            resp = await self._conn.unary(self._stub.DeleteProcess, pb.DeleteProcessRequest(
                container_id=container_id, exec_id=exec_id))
        else:
            resp = await self._conn.unary(self._stub.Delete,
                                          pb.DeleteTaskRequest(container_id=container_id))
        return Exit(resp.exit_status, nanos(resp.exited_at))

    async def exec(self, container_id: str, exec_id: str, process: dict[str, Any],
                   stdio: Stdio = Stdio()) -> None:
        """Add a process described by an OCI ``process`` object to a running task."""
        await self._conn.unary(self._stub.Exec, pb.ExecProcessRequest(
            container_id=container_id, exec_id=exec_id, stdin=stdio.stdin,
            stdout=stdio.stdout, stderr=stdio.stderr, terminal=stdio.terminal,
            spec=pack_json(PROCESS_TYPE_URL, process)))

    async def resize(self, container_id: str, width: int, height: int,
                     exec_id: str = "") -> None:
        await self._conn.unary(self._stub.ResizePty, pb.ResizePtyRequest(
            container_id=container_id, exec_id=exec_id, width=width, height=height))

    async def close_stdin(self, container_id: str, exec_id: str = "") -> None:
        await self._conn.unary(self._stub.CloseIO, pb.CloseIORequest(
            container_id=container_id, exec_id=exec_id, stdin=True))

    async def pause(self, container_id: str) -> None:
        await self._conn.unary(self._stub.Pause, pb.PauseTaskRequest(container_id=container_id))

    async def resume(self, container_id: str) -> None:
        await self._conn.unary(self._stub.Resume, pb.ResumeTaskRequest(container_id=container_id))

    async def pids(self, container_id: str) -> list[int]:
        resp = await self._conn.unary(self._stub.ListPids,
                                      pb.ListPidsRequest(container_id=container_id))
        return [p.pid for p in resp.processes]

