"""Every plugin of the daemon, in one list: read this to see the whole of ctrd.

Each entry names the plugin's type and id (as `ctr plugins ls` shows them), the
function that builds it, and the plugin types it needs. The registry in
:mod:`ctrd.daemon.plugin` starts them in dependency order.
"""
from __future__ import annotations

from .events import plugin as events
from .metadata import plugin as metadata
from .plugin import EVENT, GRPC, METADATA, Plugin
from .services import events as events_service
from .services import introspection as introspection_service
from .services import namespaces as namespaces_service
from .services import version as version_service

PLUGINS: list[Plugin] = [
    # Core backends.
    Plugin(EVENT, "exchange", events.init),
    Plugin(METADATA, "sqlite", metadata.init),
    # gRPC services: thin adapters from protobuf to the core objects above.
    Plugin(GRPC, "events", events_service.init, requires=(EVENT,)),
    Plugin(GRPC, "namespaces", namespaces_service.init, requires=(METADATA, EVENT)),
    Plugin(GRPC, "introspection", introspection_service.init),
    Plugin(GRPC, "version", version_service.init),
]
