"""containerd.services.introspection.v1.Introspection: what plugins this daemon runs."""
from __future__ import annotations

import os
import uuid
from pathlib import Path

from google.protobuf import empty_pb2
from google.rpc import status_pb2

from ctrd import filters
from ctrd.api.containerd.services.introspection.v1 import introspection_pb2 as pb
from ctrd.errors import to_code

from ..plugin import InitContext, Loaded, Registry, SkipPlugin
from .interceptor import Registrar


def _to_pb(entry: Loaded) -> pb.Plugin:
    ctx = entry.context
    plugin = pb.Plugin(type=entry.plugin.type, id=entry.plugin.id,
                       requires=list(entry.plugin.requires))
    if ctx is not None:
        plugin.exports.update(ctx.exports)
        plugin.capabilities.extend(ctx.capabilities)
    if entry.error is not None:
        # A skipped plugin shows as "skip" in `ctr plugins ls`, a failed one as "error".
        code, message = to_code(entry.error)
        if isinstance(entry.error, SkipPlugin):
            code = 9  # FailedPrecondition, which ctr prints as skip
        plugin.init_err.CopyFrom(status_pb2.Status(code=code, message=message))
    return plugin


def _fields(entry: Loaded):
    def field(path: tuple[str, ...]) -> str | None:
        if path == ("type",):
            return entry.plugin.type
        if path == ("id",):
            return entry.plugin.id
        if path and path[0] == "capabilities" and entry.context is not None:
            return "" if len(path) == 2 and path[1] in entry.context.capabilities else None
        return None
    return field


class IntrospectionService:
    def __init__(self, registry: Registry, server_uuid: str) -> None:
        self.registry = registry
        self.uuid = server_uuid

    def register(self, server: Registrar) -> None:
        server.add_service(pb.DESCRIPTOR.services_by_name["Introspection"], self)

    async def Plugins(self, request: pb.PluginsRequest, context) -> pb.PluginsResponse:
        matcher = filters.parse_all(list(request.filters))
        return pb.PluginsResponse(plugins=[
            _to_pb(e) for e in self.registry.loaded.values() if matcher.match(_fields(e))])

    async def Server(self, request: empty_pb2.Empty, context) -> pb.ServerResponse:
        return pb.ServerResponse(uuid=self.uuid, pid=os.getpid(), pidns=_pid_namespace())


def _pid_namespace() -> int:
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return 0


def _persisted_uuid(folder: Path) -> str:
    """The daemon's identity, created once and kept across restarts."""
    path = folder / "uuid"
    try:
        value = path.read_text().strip()
        uuid.UUID(value)
        return value
    except (OSError, ValueError):
        value = str(uuid.uuid4())
        folder.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(value)
        os.replace(tmp, path)
        return value


def init(ctx: InitContext) -> IntrospectionService:
    return IntrospectionService(ctx.registry, _persisted_uuid(ctx.root))
