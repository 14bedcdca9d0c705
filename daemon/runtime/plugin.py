"""The runtime plugins: the ttrpc events endpoint and the v2 task manager."""
from __future__ import annotations

from ctrd.errors import NotFound

from ..metadata.containers import ContainerStore
from ..plugin import EVENT, METADATA, InitContext
from .events_endpoint import EventsEndpoint
from .shim_manager import ManagerConfig, TaskManager


async def init_events_endpoint(ctx: InitContext) -> EventsEndpoint:
    endpoint = EventsEndpoint(ctx.get(EVENT), ctx.config.ttrpc_address)
    await endpoint.start()
    ctx.exports["address"] = ctx.config.ttrpc_address
    return endpoint


async def init_task_manager(ctx: InitContext) -> TaskManager:
    store = ContainerStore(ctx.get(METADATA).db)

    async def runtime_of(namespace: str, id_: str) -> str | None:
        try:
            return (await store.get(namespace, id_)).runtime_name
        except NotFound:
            return None

    for folder in (ctx.root, ctx.state):
        folder.mkdir(parents=True, exist_ok=True, mode=0o711)
    config = ManagerConfig(
        root=ctx.root, state=ctx.state, address=ctx.config.address,
        ttrpc_address=ctx.config.ttrpc_address,
        shims=dict(ctx.options.get("shims", {})),
        load_timeout=ctx.config.shim_load_timeout,
        debug=ctx.config.log_level == "debug")
    manager = TaskManager(config, ctx.get(EVENT), runtime_of)
    await manager.load_existing()
    manager.start_zygote()
    return manager
