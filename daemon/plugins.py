"""Every plugin of the daemon, in one list: read this to see the whole of ctrd.

Each entry names the plugin's type and id (as `ctr plugins ls` shows them), the
function that builds it, and the plugin types it needs. The registry in
:mod:`ctrd.daemon.plugin` starts them in dependency order.
"""
from __future__ import annotations

from .content import plugin as content
from .cri import plugin as cri
from .diff import walking as walking_differ
from .events import plugin as events
from .gc import scheduler as gc_scheduler
from .metadata import plugin as metadata
from .metadata import snapshots as snapshots_store
from .metadata.images import ImageStore
from .metadata.leases import LeaseStore
from .plugin import (CONTENT, DIFF, EVENT, GC, GRPC, INTERNAL, LEASE, METADATA, RUNTIME, SERVICE,
                     SNAPSHOT, TRANSFER, TTRPC, Plugin)
from .runtime import plugin as runtime
from .services import containers as containers_service
from .services import content as content_service
from .services import cri as cri_service
from .services import diff as diff_service
from .services import events as events_service
from .services import images as images_service
from .services import introspection as introspection_service
from .services import leases as leases_service
from .services import namespaces as namespaces_service
from .services import snapshots as snapshots_service
from .services import streaming as streaming_service
from .services import tasks as tasks_service
from .services import transfer as transfer_service
from .services import version as version_service
from .snapshots import native as native_snapshotter
from .snapshots import overlay as overlay_snapshotter
from .transfer import local as local_transfer

PLUGINS: list[Plugin] = [
    # Core backends.
    Plugin(EVENT, "exchange", events.init),
    Plugin(METADATA, "sqlite", metadata.init),
    Plugin(CONTENT, "content", content.init_store),
    Plugin(SERVICE, "content-service", content.init_service, requires=(METADATA, CONTENT, EVENT)),
    Plugin(SERVICE, "images-service", lambda ctx: ImageStore(ctx.get(METADATA).db),
           requires=(METADATA,)),
    Plugin(SNAPSHOT, "native", native_snapshotter.init),
    Plugin(SNAPSHOT, "overlayfs", overlay_snapshotter.init),
    Plugin(SERVICE, "snapshots-service", snapshots_store.init, requires=(METADATA, SNAPSHOT)),
    Plugin(DIFF, "walking", walking_differ.init, requires=(f"{SERVICE}.content-service",)),
    Plugin(LEASE, "manager", lambda ctx: LeaseStore(ctx.get(METADATA).db), requires=(METADATA,)),
    Plugin(GC, "scheduler", gc_scheduler.init,
           requires=(METADATA, f"{SERVICE}.content-service")),
    # Client-opened streams (progress, credentials, archive data) that transfers use.
    Plugin(INTERNAL, "streaming", streaming_service.init_manager),
    Plugin(TRANSFER, "local", local_transfer.init,
           requires=(f"{SERVICE}.content-service", f"{SERVICE}.images-service",
                     f"{SERVICE}.snapshots-service", DIFF, LEASE, EVENT)),
    # Shims forward their events to this ttrpc endpoint (<address>.ttrpc).
    Plugin(TTRPC, "events", runtime.init_events_endpoint, requires=(EVENT,)),
    Plugin(RUNTIME, "task", runtime.init_task_manager, requires=(EVENT, METADATA, TTRPC)),
    # Kubernetes' CRI: pods (CNI networks, pause sandboxes) and their containers.
    Plugin(INTERNAL, "cri", cri.init,
           requires=(METADATA, EVENT, GC, DIFF, SNAPSHOT, RUNTIME, TRANSFER,
                     f"{SERVICE}.content-service", f"{SERVICE}.images-service",
                     f"{SERVICE}.snapshots-service")),
    # gRPC services: thin adapters from protobuf to the core objects above.
    Plugin(GRPC, "events", events_service.init, requires=(EVENT,)),
    Plugin(GRPC, "namespaces", namespaces_service.init, requires=(METADATA, EVENT)),
    Plugin(GRPC, "containers", containers_service.init, requires=(METADATA, EVENT, GC)),
    Plugin(GRPC, "tasks", tasks_service.init, requires=(METADATA, RUNTIME)),
    Plugin(GRPC, "content", content_service.init, requires=(f"{SERVICE}.content-service",)),
    Plugin(GRPC, "images", images_service.init,
           requires=(f"{SERVICE}.images-service", EVENT, GC)),
    Plugin(GRPC, "leases", leases_service.init, requires=(LEASE, GC)),
    Plugin(GRPC, "snapshots", snapshots_service.init,
           requires=(f"{SERVICE}.snapshots-service", EVENT, GC)),
    Plugin(GRPC, "diff", diff_service.init, requires=(DIFF,)),
    Plugin(GRPC, "streaming", streaming_service.init, requires=(f"{INTERNAL}.streaming",)),
    Plugin(GRPC, "transfer", transfer_service.init,
           requires=(TRANSFER, f"{INTERNAL}.streaming")),
    Plugin(GRPC, "cri", cri_service.init, requires=(f"{INTERNAL}.cri",)),
    Plugin(GRPC, "introspection", introspection_service.init),
    Plugin(GRPC, "version", version_service.init),
]
