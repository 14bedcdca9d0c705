"""The plugin mechanism: how backends and services are declared, ordered and started.

The list of plugins itself lives in :mod:`ctrd.daemon.plugins`; this module only
knows how to bring such a list up. A plugin names the plugin *types* (or exact
``type.id`` URIs) it requires; the registry starts plugins in dependency order,
and a plugin whose init fails is kept with its error so that introspection can
report it (``ctr plugins ls`` shows it as ``error``) while the daemon carries on
without it.
"""
from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from ctrd.errors import FailedPrecondition, InvalidArgument, NotFound

from .config import Config

log = structlog.get_logger()

# Plugin types, named as containerd names them so that `ctr plugins ls` reads the same.
METADATA = "io.containerd.metadata.v1"
CONTENT = "io.containerd.content.v1"
SNAPSHOT = "io.containerd.snapshotter.v1"
DIFF = "io.containerd.differ.v1"
GC = "io.containerd.gc.v1"
EVENT = "io.containerd.event.v1"
LEASE = "io.containerd.lease.v1"
SERVICE = "io.containerd.service.v1"
GRPC = "io.containerd.grpc.v1"
TTRPC = "io.containerd.ttrpc.v1"
RUNTIME = "io.containerd.runtime.v2"
INTERNAL = "io.containerd.internal.v1"
TRANSFER = "io.containerd.transfer.v1"


class SkipPlugin(Exception):
    """Raised by an init that decides its plugin does not apply on this host."""


@dataclass(frozen=True)
class Plugin:
    type: str
    id: str
    init: Callable[["InitContext"], Awaitable[Any] | Any]
    requires: tuple[str, ...] = ()

    @property
    def uri(self) -> str:
        return f"{self.type}.{self.id}"


@dataclass
class InitContext:
    """What a plugin's init gets: its config, its folders and its dependencies."""

    plugin: Plugin
    config: Config
    registry: "Registry"
    # Filled in by the init for introspection (containerd's Exports/Capabilities).
    exports: dict[str, str] = field(default_factory=dict)
    capabilities: list[str] = field(default_factory=list)

    @property
    def options(self) -> dict[str, Any]:
        return self.config.plugin(self.plugin.uri)

    @property
    def root(self) -> Path:
        return Path(self.config.root) / self.plugin.uri

    @property
    def state(self) -> Path:
        return Path(self.config.state) / self.plugin.uri

    def get(self, type_: str, id_: str | None = None) -> Any:
        return self.registry.get(type_, id_)

    def get_all(self, type_: str) -> dict[str, Any]:
        return self.registry.get_all(type_)


@dataclass
class Loaded:
    plugin: Plugin
    instance: Any = None
    error: BaseException | None = None
    context: InitContext | None = None


class Registry:
    """Starts plugins in dependency order and hands out their instances."""

    def __init__(self, plugins: list[Plugin], config: Config) -> None:
        self._config = config
        self._order = _sorted(plugins)
        self.loaded: dict[str, Loaded] = {}

    async def start(self) -> None:
        for plugin in self._order:
            entry = Loaded(plugin)
            self.loaded[plugin.uri] = entry
            if plugin.uri in self._config.disabled_plugins:
                entry.error = SkipPlugin("disabled by configuration")
                continue
            ctx = InitContext(plugin, self._config, self)
            entry.context = ctx
            try:
                result = plugin.init(ctx)
                entry.instance = await result if inspect.isawaitable(result) else result
                log.debug("plugin loaded", plugin=plugin.uri)
            except SkipPlugin as exc:
                entry.error = exc
                log.info("plugin skipped", plugin=plugin.uri, reason=str(exc))
            except Exception as exc:  # noqa: BLE001 - any init failure is reported, not fatal
                entry.error = exc
                log.warning("plugin failed to load", plugin=plugin.uri, error=str(exc))

    def get(self, type_: str, id_: str | None = None) -> Any:
        matches = [e for e in self.loaded.values()
                   if e.plugin.type == type_ and (id_ is None or e.plugin.id == id_)]
        if not matches:
            raise NotFound(f"plugin {type_}{'.' + id_ if id_ else ''}: not found")
        ready = [e for e in matches if e.error is None]
        if not ready:
            raise FailedPrecondition(f"plugin {matches[0].plugin.uri}: {matches[0].error}")
        if len(ready) > 1 and id_ is None:
            raise InvalidArgument(f"plugin type {type_} has several instances; name one")
        return ready[0].instance

    def get_all(self, type_: str) -> dict[str, Any]:
        return {e.plugin.id: e.instance for e in self.loaded.values()
                if e.plugin.type == type_ and e.error is None}

    async def close(self) -> None:
        for entry in reversed(list(self.loaded.values())):
            closer = getattr(entry.instance, "aclose", None) or getattr(entry.instance, "close", None)
            if closer is None or entry.error is not None:
                continue
            try:
                result = closer()
                if inspect.isawaitable(result):
                    await result
            except Exception as exc:  # noqa: BLE001 - shutting down: log and keep closing
                log.warning("plugin close failed", plugin=entry.plugin.uri, error=str(exc))


def _sorted(plugins: list[Plugin]) -> list[Plugin]:
    """Dependency order, stable with respect to the declared order."""
    by_uri = {p.uri: p for p in plugins}
    if len(by_uri) != len(plugins):
        raise InvalidArgument("duplicate plugin URI in the plugin list")
    done: dict[str, Plugin] = {}
    visiting: set[str] = set()

    def visit(p: Plugin) -> None:
        if p.uri in done:
            return
        if p.uri in visiting:
            raise InvalidArgument(f"plugin dependency cycle through {p.uri}")
        visiting.add(p.uri)
        for req in p.requires:
            for dep in plugins:
                if dep.type == req or dep.uri == req:
                    visit(dep)
        visiting.discard(p.uri)
        done[p.uri] = p

    for p in plugins:
        visit(p)
    return list(done.values())
