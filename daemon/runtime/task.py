"""One task: the ttrpc client of its shim and the calls of containerd.task.v2.Task.

Errors coming back from the shim arrive as :mod:`ctrd.errors` classes (the ttrpc
client maps status codes), so a NotFound from the shim is a NotFound here.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from google.protobuf import any_pb2, empty_pb2
from google.protobuf.message import Message

from ctrd.api.containerd.runtime.task.v2 import shim_pb2 as pb
from ctrd.api.containerd.types import mount_pb2
from ctrd.errors import NotFound
from ctrd.ttrpc import aio
from ctrd.ttrpc.codec import ClosedError

from .binary import ShimCommand
from .bundle import Bundle
from .shimlog import ShimLog

SERVICE = "containerd.task.v2.Task"
# containerd's shim clients carry the namespace under this ttrpc metadata key.
NAMESPACE_HEADER = "containerd-namespace-ttrpc"


@dataclass(frozen=True)
class IO:
    stdin: str = ""
    stdout: str = ""
    stderr: str = ""
    terminal: bool = False


@dataclass(frozen=True)
class Exit:
    pid: int
    status: int
    exited_at: int  # ns


@dataclass
class ShimTask:
    bundle: Bundle
    # None for a bundle whose shim could not be reached: only cleanup applies to it.
    client: aio.Client | None
    command: ShimCommand
    shim_log: ShimLog | None = None
    # Set once the daemon itself deletes the task, so that the connection closing
    # afterwards is not taken for a shim that died.
    deleting: bool = False

    @property
    def id(self) -> str:
        return self.bundle.id

    @property
    def namespace(self) -> str:
        return self.bundle.namespace

    async def _call(self, method: str, request: Message, response_cls: type[Message],
                    timeout: float | None = None) -> Message:
        if self.client is None:
            raise ClosedError(f"task {self.id}: no connection to its shim")
        return await self.client.call(SERVICE, method, request, response_cls, timeout=timeout,
                                      metadata={NAMESPACE_HEADER: self.namespace})

    async def create(self, io: IO, rootfs: Sequence[mount_pb2.Mount], options: any_pb2.Any | None,
                     checkpoint: str = "") -> int:
        req = pb.CreateTaskRequest(id=self.id, bundle=str(self.bundle.path), stdin=io.stdin,
                                   stdout=io.stdout, stderr=io.stderr, terminal=io.terminal,
                                   checkpoint=checkpoint, rootfs=list(rootfs))
        if options is not None:
            req.options.CopyFrom(options)
        resp = await self._call("Create", req, pb.CreateTaskResponse)
        return resp.pid

    async def connect(self, timeout: float | None = None) -> pb.ConnectResponse:
        return await self._call("Connect", pb.ConnectRequest(id=self.id), pb.ConnectResponse,
                                timeout=timeout)

    async def start(self, exec_id: str = "") -> int:
        resp = await self._call("Start", pb.StartRequest(id=self.id, exec_id=exec_id),
                                pb.StartResponse)
        return resp.pid

    async def state(self, exec_id: str = "", timeout: float | None = None) -> pb.StateResponse:
        try:
            return await self._call("State", pb.StateRequest(id=self.id, exec_id=exec_id),
                                    pb.StateResponse, timeout=timeout)
        except ClosedError:
            raise NotFound(f"task {self.id}: shim connection closed") from None

    async def delete_process(self, exec_id: str) -> Exit:
        resp = await self._call("Delete", pb.DeleteRequest(id=self.id, exec_id=exec_id),
                                pb.DeleteResponse)
        return Exit(resp.pid, resp.exit_status, resp.exited_at.ToNanoseconds())

    async def kill(self, signal: int, all_: bool = False, exec_id: str = "") -> None:
        await self._call("Kill", pb.KillRequest(id=self.id, exec_id=exec_id, signal=signal,
                                                all=all_), empty_pb2.Empty)

    async def exec(self, exec_id: str, io: IO, spec: any_pb2.Any | None) -> None:
        req = pb.ExecProcessRequest(id=self.id, exec_id=exec_id, stdin=io.stdin,
                                    stdout=io.stdout, stderr=io.stderr, terminal=io.terminal)
        if spec is not None:
            req.spec.CopyFrom(spec)
        await self._call("Exec", req, empty_pb2.Empty)

    async def resize_pty(self, exec_id: str, width: int, height: int) -> None:
        await self._call("ResizePty", pb.ResizePtyRequest(id=self.id, exec_id=exec_id,
                                                          width=width, height=height),
                         empty_pb2.Empty)

    async def close_io(self, exec_id: str) -> None:
        await self._call("CloseIO", pb.CloseIORequest(id=self.id, exec_id=exec_id, stdin=True),
                         empty_pb2.Empty)

    async def pause(self) -> None:
        await self._call("Pause", pb.PauseRequest(id=self.id), empty_pb2.Empty)

    async def resume(self) -> None:
        await self._call("Resume", pb.ResumeRequest(id=self.id), empty_pb2.Empty)

    async def pids(self) -> pb.PidsResponse:
        return await self._call("Pids", pb.PidsRequest(id=self.id), pb.PidsResponse)

    async def checkpoint(self, path: str, options: any_pb2.Any | None) -> None:
        req = pb.CheckpointTaskRequest(id=self.id, path=path)
        if options is not None:
            req.options.CopyFrom(options)
        await self._call("Checkpoint", req, empty_pb2.Empty)

    async def update(self, resources: any_pb2.Any | None, annotations: dict[str, str]) -> None:
        req = pb.UpdateTaskRequest(id=self.id, annotations=annotations)
        if resources is not None:
            req.resources.CopyFrom(resources)
        await self._call("Update", req, empty_pb2.Empty)

    async def wait(self, exec_id: str = "") -> Exit:
        resp = await self._call("Wait", pb.WaitRequest(id=self.id, exec_id=exec_id),
                                pb.WaitResponse)
        return Exit(0, resp.exit_status, resp.exited_at.ToNanoseconds())

    async def stats(self) -> any_pb2.Any:
        resp = await self._call("Stats", pb.StatsRequest(id=self.id), pb.StatsResponse)
        return resp.stats

    async def shutdown(self, timeout: float) -> None:
        try:
            await self._call("Shutdown", pb.ShutdownRequest(id=self.id), empty_pb2.Empty,
                             timeout=timeout)
        except ClosedError:
            pass  # the shim exits as it answers; a closed connection is success

    async def close(self) -> None:
        if self.client is not None:
            await self.client.close()
        if self.shim_log is not None:
            self.shim_log.close()
