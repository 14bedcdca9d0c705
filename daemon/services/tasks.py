"""containerd.services.tasks.v1.Tasks over the task manager and its shims.

Thin, like containerd's own tasks service: the container record supplies the spec
and runtime, the task manager owns the shims, and every lifecycle event
(``/tasks/create``, ``/tasks/exit``...) is published by the shims themselves through
the ttrpc events endpoint.
"""
from __future__ import annotations

import asyncio
import shutil
import time

import structlog
from google.protobuf import any_pb2, empty_pb2

from ctrd import filters, identifiers
from ctrd.api.containerd.runc.options import oci_pb2 as runc_options
from ctrd.api.containerd.services.tasks.v1 import tasks_pb2 as pb
from ctrd.api.containerd.types import metrics_pb2, mount_pb2
from ctrd.api.containerd.types.task import task_pb2
from ctrd.errors import CtrdError, InvalidArgument, NotFound, Unimplemented
from ctrd.protoutil import timestamp

from ..metadata.containers import Container, ContainerStore, validate_spec
from ..plugin import METADATA, RUNTIME, SERVICE, InitContext, Registry
from ..runtime.shim_manager import CreateOpts, TaskManager
from ..runtime.task import IO, ShimTask
from . import context as rpcctx
from .interceptor import Registrar

log = structlog.get_logger()

STATE_TIMEOUT = 2.0
_RUNC_OPTIONS = "containerd.runc.v1.Options"
_RUNC_CHECKPOINT_OPTIONS = "containerd.runc.v1.CheckpointOptions"


def _process(id_: str, state) -> task_pb2.Process:
    return task_pb2.Process(id=id_, pid=state.pid, status=state.status, stdin=state.stdin,
                            stdout=state.stdout, stderr=state.stderr, terminal=state.terminal,
                            exit_status=state.exit_status, exited_at=state.exited_at)


def _unpack_runc(value: any_pb2.Any | None, type_name: str, cls):
    """runc options of a request, or None when absent or of another runtime's type."""
    if value is None or value.type_url.rsplit("/", 1)[-1] != type_name:
        return None
    msg = cls()
    msg.ParseFromString(value.value)
    return msg


class TasksService:
    def __init__(self, containers: ContainerStore, tasks: TaskManager,
                 registry: Registry | None = None) -> None:
        self.containers = containers
        self.tasks = tasks
        self._registry = registry

    def register(self, server: Registrar) -> None:
        server.add_service(pb.DESCRIPTOR.services_by_name["Tasks"], self)

    # -- helpers -----------------------------------------------------------

    async def _task(self, context, container_id: str) -> tuple[str, ShimTask]:
        ns = rpcctx.namespace(context)
        await self.containers.get(ns, container_id)
        try:
            return ns, self.tasks.get(ns, container_id)
        except NotFound:
            raise NotFound(f"task {container_id} not found") from None

    async def _state(self, task: ShimTask, exec_id: str = "") -> task_pb2.Process:
        try:
            state = await task.state(exec_id, timeout=STATE_TIMEOUT)
        except NotFound:
            raise
        except CtrdError as exc:
            log.error("task state failed", id=task.id, exec_id=exec_id, error=str(exc))
            return task_pb2.Process(id=exec_id or task.id, status=task_pb2.UNKNOWN)
        return _process(exec_id or task.id, state)

    async def _snapshot_mounts(self, ns: str, container: Container) -> list[mount_pb2.Mount]:
        """The container's snapshot mounts, for a Create that carried no rootfs."""
        if self._registry is None or not (container.snapshotter and container.snapshot_key):
            return []
        try:
            snapshots = self._registry.get(SERVICE, "snapshots-service")
        except CtrdError:
            return []
        mounts = await snapshots.mounts(ns, container.snapshotter, container.snapshot_key)
        return [mount_pb2.Mount(type=m.type, source=m.source, options=list(m.options))
                for m in mounts]

    # -- lifecycle ---------------------------------------------------------

    async def Create(self, request: pb.CreateTaskRequest, context) -> pb.CreateTaskResponse:
        ns = rpcctx.namespace(context)
        container = await self.containers.get(ns, request.container_id)
        if container.spec is None:
            raise InvalidArgument(f"container {container.id} has no spec")
        validate_spec(container.spec)
        if request.HasField("checkpoint") and request.checkpoint.digest:
            raise Unimplemented("restoring a task from a checkpoint image is not supported")
        task_options = request.options if request.HasField("options") else None
        restore = ""
        if container.runtime_name.startswith("io.containerd.runc."):
            opts = _unpack_runc(task_options, _RUNC_OPTIONS, runc_options.Options)
            restore = opts.criu_image_path if opts is not None else ""
        rootfs = list(request.rootfs) or await self._snapshot_mounts(ns, container)
        runtime_options = None
        if container.runtime_options is not None:
            runtime_options = any_pb2.Any(type_url=container.runtime_options.type_url,
                                          value=container.runtime_options.value)
        opts = CreateOpts(
            spec=container.spec.value,
            runtime=request.runtime_path or container.runtime_name,
            io=IO(request.stdin, request.stdout, request.stderr, request.terminal),
            rootfs=rootfs, runtime_options=runtime_options, task_options=task_options,
            checkpoint=restore)
        _, pid = await self.tasks.create(ns, request.container_id, opts)
        return pb.CreateTaskResponse(container_id=request.container_id, pid=pid)

    async def Start(self, request: pb.StartRequest, context) -> pb.StartResponse:
        _, task = await self._task(context, request.container_id)
        if request.exec_id:
            await task.state(request.exec_id)
        return pb.StartResponse(pid=await task.start(request.exec_id))

    async def Delete(self, request: pb.DeleteTaskRequest, context) -> pb.DeleteResponse:
        ns, _ = await self._task(context, request.container_id)
        exit_ = await self.tasks.delete(ns, request.container_id)
        return pb.DeleteResponse(pid=exit_.pid, exit_status=exit_.status,
                                 exited_at=timestamp(exit_.exited_at))

    async def DeleteProcess(self, request: pb.DeleteProcessRequest,
                            context) -> pb.DeleteResponse:
        _, task = await self._task(context, request.container_id)
        if not request.exec_id:
            raise InvalidArgument("exec id cannot be empty")
        await task.state(request.exec_id)
        exit_ = await task.delete_process(request.exec_id)
        return pb.DeleteResponse(id=request.exec_id, pid=exit_.pid, exit_status=exit_.status,
                                 exited_at=timestamp(exit_.exited_at))

    async def Get(self, request: pb.GetRequest, context) -> pb.GetResponse:
        _, task = await self._task(context, request.container_id)
        return pb.GetResponse(process=await self._state(task, request.exec_id))

    async def List(self, request: pb.ListTasksRequest, context) -> pb.ListTasksResponse:
        ns = rpcctx.namespace(context)
        found = self.tasks.list(ns)
        states = await asyncio.gather(*(self._state(t) for t in found), return_exceptions=True)
        resp = pb.ListTasksResponse()
        for task, state in zip(found, states):
            if isinstance(state, NotFound):
                continue  # deleted meanwhile
            if isinstance(state, BaseException):
                log.error("task state failed", id=task.id, error=str(state))
                continue
            resp.tasks.append(state)
        return resp

    # -- processes ---------------------------------------------------------

    async def Kill(self, request: pb.KillRequest, context) -> empty_pb2.Empty:
        _, task = await self._task(context, request.container_id)
        if request.exec_id:
            await task.state(request.exec_id)
        await task.kill(request.signal, request.all, request.exec_id)
        return empty_pb2.Empty()

    async def Exec(self, request: pb.ExecProcessRequest, context) -> empty_pb2.Empty:
        if not request.exec_id:
            raise InvalidArgument("exec id cannot be empty")
        _, task = await self._task(context, request.container_id)
        try:
            identifiers.validate(request.exec_id)
        except InvalidArgument as exc:
            raise InvalidArgument(f"invalid exec id {request.exec_id}: {exc}") from None
        await task.exec(request.exec_id,
                        IO(request.stdin, request.stdout, request.stderr, request.terminal),
                        request.spec if request.HasField("spec") else None)
        return empty_pb2.Empty()

    async def ResizePty(self, request: pb.ResizePtyRequest, context) -> empty_pb2.Empty:
        _, task = await self._task(context, request.container_id)
        if request.exec_id:
            await task.state(request.exec_id)
        await task.resize_pty(request.exec_id, request.width, request.height)
        return empty_pb2.Empty()

    async def CloseIO(self, request: pb.CloseIORequest, context) -> empty_pb2.Empty:
        _, task = await self._task(context, request.container_id)
        if request.exec_id:
            await task.state(request.exec_id)
        if request.stdin:
            await task.close_io(request.exec_id)
        return empty_pb2.Empty()

    async def Wait(self, request: pb.WaitRequest, context) -> pb.WaitResponse:
        _, task = await self._task(context, request.container_id)
        if request.exec_id:
            await task.state(request.exec_id)
        exit_ = await task.wait(request.exec_id)
        return pb.WaitResponse(exit_status=exit_.status, exited_at=timestamp(exit_.exited_at))

    # -- whole task --------------------------------------------------------

    async def Pause(self, request: pb.PauseTaskRequest, context) -> empty_pb2.Empty:
        _, task = await self._task(context, request.container_id)
        await task.pause()
        return empty_pb2.Empty()

    async def Resume(self, request: pb.ResumeTaskRequest, context) -> empty_pb2.Empty:
        _, task = await self._task(context, request.container_id)
        await task.resume()
        return empty_pb2.Empty()

    async def ListPids(self, request: pb.ListPidsRequest, context) -> pb.ListPidsResponse:
        _, task = await self._task(context, request.container_id)
        resp = await task.pids()
        return pb.ListPidsResponse(processes=list(resp.processes))

    async def Checkpoint(self, request: pb.CheckpointTaskRequest,
                         context) -> pb.CheckpointTaskResponse:
        ns = rpcctx.namespace(context)
        container = await self.containers.get(ns, request.container_id)
        _, task = await self._task(context, request.container_id)
        if shutil.which("criu") is None:
            raise Unimplemented("checkpoint needs CRIU, which is not installed on this host")
        options = request.options if request.HasField("options") else None
        image_path = ""
        if container.runtime_name.startswith("io.containerd.runc."):
            opts = _unpack_runc(options, _RUNC_CHECKPOINT_OPTIONS,
                                runc_options.CheckpointOptions)
            image_path = opts.image_path if opts is not None else ""
        if not image_path:
            raise Unimplemented(
                "checkpoint into the content store is not supported; set an image path "
                "in the checkpoint options")
        await task.checkpoint(image_path, options)
        return pb.CheckpointTaskResponse()

    async def Update(self, request: pb.UpdateTaskRequest, context) -> empty_pb2.Empty:
        _, task = await self._task(context, request.container_id)
        await task.update(request.resources if request.HasField("resources") else None,
                          dict(request.annotations))
        return empty_pb2.Empty()

    async def Metrics(self, request: pb.MetricsRequest, context) -> pb.MetricsResponse:
        ns = rpcctx.namespace(context)
        matcher = filters.parse_all(list(request.filters))
        resp = pb.MetricsResponse()
        for task in self.tasks.list(ns):
            fields = {"id": task.id, "namespace": task.namespace}
            if not matcher.match(lambda path, f=fields: f.get(path[0]) if len(path) == 1
                                 else None):
                continue
            collected = time.time_ns()
            try:
                stats = await task.stats()
            except NotFound:
                continue
            except CtrdError as exc:
                log.error("collecting metrics failed", id=task.id, error=str(exc))
                continue
            resp.metrics.append(metrics_pb2.Metric(timestamp=timestamp(collected), id=task.id,
                                                   data=stats))
        return resp


def init(ctx: InitContext) -> TasksService:
    return TasksService(ContainerStore(ctx.get(METADATA).db), ctx.get(RUNTIME, "task"),
                        ctx.registry)
