"""The CRI core plugin: images, pods and containers over the daemon's own backends."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..metadata.containers import ContainerStore
from ..plugin import DIFF, EVENT, GC, METADATA, RUNTIME, SERVICE, SNAPSHOT, TRANSFER, InitContext
from ..unpack import Unpacker
from .cni import CNI, CNIOptions
from .config import CRIConfig
from .containers import ContainerManager
from .events import EventFeed
from .images import CRIImages
from .runtime import CRIRuntime
from .sandboxes import SandboxManager
from .store import CRIStore
from .streaming.server import AttachTarget, ExecTarget, StreamServer
from .streaming.streams import CommandStreams


@dataclass
class CRI:
    """What the CRI gRPC services call."""

    config: CRIConfig
    images: CRIImages
    runtime: CRIRuntime
    network: CNI
    streaming: StreamServer

    async def aclose(self) -> None:
        await self.streaming.aclose()
        await self.runtime.aclose()


# The config table containerd reads its CRI settings from; ctrd reads the same one.
CONFIG_TABLE = "io.containerd.grpc.v1.cri"


async def init(ctx: InitContext) -> CRI:
    config = CRIConfig.from_options(ctx.config.plugin(CONFIG_TABLE), ctx.root, ctx.state)
    for folder in (config.root, config.state):
        folder.mkdir(parents=True, exist_ok=True, mode=0o711)
    content = ctx.get(SERVICE, "content-service")
    snapshots = ctx.get(SERVICE, "snapshots-service")
    snapshotter = ctx.get(SNAPSHOT, config.snapshotter)
    images = CRIImages(ctx.get(SERVICE, "images-service"), content,
                       Unpacker(content, snapshots, ctx.get(DIFF, "walking")),
                       ctx.get(TRANSFER, "local"), ctx.get(EVENT), ctx.get(GC, "scheduler"),
                       config.snapshotter, Path(snapshotter.root))
    network = CNI(CNIOptions(conf_dir=config.cni_conf_dir,
                             bin_dirs=tuple(Path(d) for d in config.cni_bin_dirs),
                             cache_dir=config.cni_cache_dir))
    await network.load()
    store = CRIStore(ContainerStore(ctx.get(METADATA).db), ctx.get(EVENT))
    tasks = ctx.get(RUNTIME, "task")
    feed = EventFeed()
    sandboxes = SandboxManager(config, store, images, snapshots, tasks, network, feed)
    containers = ContainerManager(config, store, images, snapshots, tasks, sandboxes.files,
                                  feed)
    runtime = CRIRuntime(sandboxes, containers, ctx.get(EVENT), feed)
    await runtime.start()

    async def run_exec(target: ExecTarget | AttachTarget, streams: CommandStreams) -> None:
        if isinstance(target, AttachTarget):
            await containers.attach_stream(target.container_id, streams)
        else:
            await containers.exec_stream(target.container_id, list(target.cmd), streams)

    streaming = StreamServer(config.stream_address, config.stream_port, run_exec,
                             sandboxes.connect)
    await streaming.start()
    ctx.exports["stream_server"] = f"{config.stream_address}:{streaming.port}"
    return CRI(config, images, runtime, network, streaming)
