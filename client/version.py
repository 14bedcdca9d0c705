"""Version and introspection: what the daemon is and which plugins it runs."""
from __future__ import annotations

from dataclasses import dataclass, field

from google.protobuf import empty_pb2

from ctrd.api.containerd.services.introspection.v1 import introspection_pb2 as ipb
from ctrd.api.containerd.services.introspection.v1 import introspection_pb2_grpc as ipb_grpc
from ctrd.api.containerd.services.version.v1 import version_pb2_grpc as vpb_grpc

from .connection import Connection
from .types import Platform


@dataclass(frozen=True)
class Version:
    version: str
    revision: str


@dataclass(frozen=True)
class Plugin:
    type: str
    id: str
    requires: tuple[str, ...] = ()
    platforms: tuple[str, ...] = ()
    exports: dict[str, str] = field(default_factory=dict)
    capabilities: tuple[str, ...] = ()
    error: str = ""  # why the plugin failed to start; empty when it runs

    @property
    def ok(self) -> bool:
        return not self.error

    @classmethod
    def from_pb(cls, msg: ipb.Plugin) -> Plugin:
        platforms = tuple(str(Platform(p.os, p.architecture, p.variant)) for p in msg.platforms)
        error = msg.init_err.message or (f"code {msg.init_err.code}" if msg.init_err.code else "")
        return cls(msg.type, msg.id, tuple(msg.requires), platforms, dict(msg.exports),
                   tuple(msg.capabilities), error)


@dataclass(frozen=True)
class ServerInfo:
    uuid: str
    pid: int
    pidns: int


class Introspection:
    def __init__(self, conn: Connection) -> None:
        self._conn = conn
        self._version = vpb_grpc.VersionStub(conn.channel)
        self._intro = ipb_grpc.IntrospectionStub(conn.channel)

    async def version(self) -> Version:
        resp = await self._conn.unary(self._version.Version, empty_pb2.Empty())
        return Version(resp.version, resp.revision)

    async def plugins(self, filters: list[str] | None = None) -> list[Plugin]:
        resp = await self._conn.unary(self._intro.Plugins,
                                      ipb.PluginsRequest(filters=filters or []))
        return [Plugin.from_pb(p) for p in resp.plugins]

    async def has_plugin(self, type: str, id: str) -> bool:
        """Whether the plugin is loaded and started without error."""
        return any(p.ok for p in await self.plugins([f"type=={type},id=={id}"]))

    async def server(self) -> ServerInfo:
        resp = await self._conn.unary(self._intro.Server, empty_pb2.Empty())
        return ServerInfo(resp.uuid, resp.pid, resp.pidns)
