"""The TRANSFER "local" plugin: pulls and pushes for the daemon's own stores.

Configuration (``[plugins."io.containerd.transfer.v1.local"]``)::

    config_path = "/etc/ctrd/certs.d"     # certs.d/<host>/hosts.toml layout
    credentials = ""                      # a Docker config.json with registry logins
    plain_http = []                       # registries always spoken to over HTTP
    max_concurrent_downloads = 3
    max_concurrent_uploads = 3
    snapshotter = "overlayfs"             # for unpacks that name none
    connect_timeout = 30                  # seconds
    read_timeout = 60                     # seconds of silence while reading
    attempts = 5                          # per request / per blob, resumes included
"""
from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import structlog

from ctrd.errors import InvalidArgument
from ctrd.reference import Reference

from ..metadata.images import Image
from ..plugin import DIFF, EVENT, LEASE, SERVICE, InitContext
from ..remotes.auth import CredentialsFunc, file_credentials
from ..remotes.hosts import DEFAULT_CONFIG_DIR, HostsConfig
from ..remotes.resolver import Resolver
from ..remotes.transport import ClientOptions, HTTPPool
from ..unpack import Unpacker
from .archive_export import ArchiveExporter, ExportOptions
from .archive_import import ArchiveImporter, ImportOptions
from .progress import ProgressFunc, Tracker
from .pull import Puller, PullOptions, Stores, lease_for
from .push import Pusher, PushOptions
from .unpacking import starter

log = structlog.get_logger()


@dataclass
class TransferConfig:
    config_path: str = DEFAULT_CONFIG_DIR
    credentials: str = ""
    plain_http: list[str] = field(default_factory=list)
    max_concurrent_downloads: int = 3
    max_concurrent_uploads: int = 3
    snapshotter: str = "overlayfs"
    client: ClientOptions = ClientOptions()

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> TransferConfig:
        client = ClientOptions(
            connect_timeout=float(options.get("connect_timeout", 30)),
            read_timeout=float(options.get("read_timeout", 60)),
            attempts=int(options.get("attempts", 5)))
        return cls(config_path=str(options.get("config_path", DEFAULT_CONFIG_DIR)),
                   credentials=str(options.get("credentials", "")),
                   plain_http=list(options.get("plain_http", [])),
                   max_concurrent_downloads=int(options.get("max_concurrent_downloads", 3)),
                   max_concurrent_uploads=int(options.get("max_concurrent_uploads", 3)),
                   snapshotter=str(options.get("snapshotter", "overlayfs")),
                   client=client)


class LocalTransfer:
    def __init__(self, stores: Stores, config: TransferConfig) -> None:
        self.stores = stores
        self.config = config
        self.pool = HTTPPool(config.client)

    def resolver(self, *, host_dir: str = "", default_scheme: str = "",
                 headers: Mapping[str, str] | None = None,
                 credentials: CredentialsFunc | None = None) -> Resolver:
        """A resolver with the daemon's defaults, overridden per request where given."""
        hosts = HostsConfig(config_dir=host_dir or self.config.config_path,
                            default_scheme=default_scheme,
                            plain_http=frozenset(self.config.plain_http))
        if credentials is None and self.config.credentials:
            credentials = file_credentials(self.config.credentials)
        return Resolver(self.pool, hosts, credentials=credentials, headers=headers)

    async def pull(self, namespace: str, ref: Reference, options: PullOptions, *,
                   resolver: Resolver | None = None,
                   progress: ProgressFunc | None = None) -> list[Image]:
        resolver = resolver or self.resolver()
        options.max_concurrent = self.config.max_concurrent_downloads
        tracker = Tracker(progress, str(ref))
        log.info("pull started", namespace=namespace, ref=str(ref))
        images = await Puller(self.stores, namespace, resolver.repository(ref), options,
                              tracker).run()
        log.info("pull done", namespace=namespace, ref=str(ref),
                 digest=images[0].target.digest if images else "")
        return images

    async def push(self, namespace: str, image: Image, ref: Reference, options: PushOptions, *,
                   resolver: Resolver | None = None,
                   progress: ProgressFunc | None = None) -> None:
        resolver = resolver or self.resolver()
        options.max_concurrent = self.config.max_concurrent_uploads
        tracker = Tracker(progress, str(ref), "uploading")
        await Pusher(self.stores, namespace, resolver.repository(ref), options, tracker).run(image)
        log.info("push done", namespace=namespace, image=image.name, ref=str(ref))

    async def import_archive(self, namespace: str, chunks: AsyncIterator[bytes],
                             options: ImportOptions, *,
                             progress: ProgressFunc | None = None) -> list[Image]:
        """Read an image archive from ``chunks`` into the stores; the images named."""
        tracker = Tracker(progress, "import")
        tracker.emit("Importing")
        log.info("import started", namespace=namespace)
        async with lease_for(self.stores, namespace, None) as lease:
            images = await ArchiveImporter(self.stores, namespace, options, tracker,
                                           lease).run(chunks)
        tracker.emit("Completed import")
        log.info("import done", namespace=namespace, images=[i.name for i in images])
        return images

    async def export_archive(self, namespace: str, options: ExportOptions,
                             send: Callable[[AsyncIterator[bytes]], Awaitable[None]], *,
                             progress: ProgressFunc | None = None) -> None:
        """Write the named images as an OCI archive: ``send`` gets its bytes."""
        if not options.names:
            raise InvalidArgument("no image to export: name at least one")
        images = [await self.stores.images.get(namespace, name)
                  for name in dict.fromkeys(options.names)]
        tracker = Tracker(progress, "export", "exporting")
        async with lease_for(self.stores, namespace, None):
            generate = await ArchiveExporter(self.stores, namespace, options,
                                             tracker).prepare(images)
            await send(generate())
        tracker.emit("Completed export")
        log.info("export done", namespace=namespace, images=options.names)

    async def aclose(self) -> None:
        await self.pool.aclose()


def init(ctx: InitContext) -> LocalTransfer:
    config = TransferConfig.from_options(ctx.options)
    content = ctx.get(SERVICE, "content-service")
    unpacker = Unpacker(content, ctx.get(SERVICE, "snapshots-service"), ctx.get(DIFF, "walking"))
    stores = Stores(content=content, images=ctx.get(SERVICE, "images-service"),
                    leases=ctx.get(LEASE), events=ctx.get(EVENT), unpack=starter(unpacker),
                    default_snapshotter=config.snapshotter)
    ctx.exports["config_path"] = config.config_path
    return LocalTransfer(stores, config)
