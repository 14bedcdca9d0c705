"""The asyncio client: one object per daemon connection, one attribute per API area.

    async with AsyncClient("/run/ctrd/ctrd.sock", namespace="default") as client:
        for image in await client.images.list():
            print(image.name)
"""
from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import cached_property

from ctrd import errors

from .archive import ImportResult, Importer
from .connection import DEFAULT_ADDRESS, DEFAULT_NAMESPACE, Connection, open_channel
from .containers import Containers
from .content import Content
from .events import Events
from .images import Images, ResolvedImage
from .leases import Leases
from .namespaces import Namespaces
from .snapshots import DEFAULT_SNAPSHOTTER, Diff, Snapshots
from .tasks import Tasks
from .transfer import Transfer
from .types import Platform
from .unpack import unpack
from .version import Introspection


class AsyncClient:
    def __init__(self, address: str = DEFAULT_ADDRESS, namespace: str = DEFAULT_NAMESPACE, *,
                 timeout: float | None = None, _conn: Connection | None = None) -> None:
        self.conn = _conn or Connection(open_channel(address), address, namespace,
                                        timeout=timeout)
        self._owner = _conn is None

    @property
    def address(self) -> str:
        return self.conn.address

    @property
    def namespace(self) -> str:
        return self.conn.namespace

    def with_namespace(self, namespace: str) -> AsyncClient:
        """A client for another namespace over the same channel (close the original)."""
        return AsyncClient(_conn=self.conn.with_namespace(namespace))

    def with_lease(self, lease: str | None) -> AsyncClient:
        return AsyncClient(_conn=self.conn.with_lease(lease))

    async def close(self) -> None:
        if self._owner:
            await self.conn.channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- service areas ----------------------------------------------------------

    @cached_property
    def namespaces(self) -> Namespaces:
        return Namespaces(self.conn)

    @cached_property
    def content(self) -> Content:
        return Content(self.conn)

    @cached_property
    def images(self) -> Images:
        return Images(self.conn)

    @cached_property
    def containers(self) -> Containers:
        return Containers(self.conn)

    @cached_property
    def tasks(self) -> Tasks:
        return Tasks(self.conn)

    @cached_property
    def snapshots(self) -> Snapshots:
        return Snapshots(self.conn)

    @cached_property
    def diff(self) -> Diff:
        return Diff(self.conn)

    @cached_property
    def events(self) -> Events:
        return Events(self.conn)

    @cached_property
    def leases(self) -> Leases:
        return Leases(self.conn)

    @cached_property
    def introspection(self) -> Introspection:
        return Introspection(self.conn)

    @cached_property
    def transfer(self) -> Transfer:
        return Transfer(self.conn)

    # -- operations spanning several services ------------------------------------

    async def version(self):
        return await self.introspection.version()

    @asynccontextmanager
    async def leased(self) -> AsyncIterator[AsyncClient]:
        """A client whose calls run under a temporary lease, so what they create is
        not collected before something references it."""
        async with self.leases.temporary() as lease_id:
            yield self.with_lease(lease_id)

    async def import_archive(self, path: str, *, base_name: str = "") -> ImportResult:
        async with self.leased() as leased:
            return await Importer(leased.content, leased.images).import_file(
                path, base_name=base_name)

    async def unpack(self, name: str, *, snapshotter: str = DEFAULT_SNAPSHOTTER,
                     platform: Platform | None = None) -> ResolvedImage:
        """Unpack image ``name`` into ``snapshotter``; returns it resolved for the platform."""
        async with self.leased() as leased:
            resolved = await leased.images.resolve(await leased.images.get(name), platform)
            await unpack(resolved, leased.snapshots.using(snapshotter), leased.diff,
                         leased.content)
        return resolved

    async def pull(self, reference: str, **kwargs) -> None:
        await self.transfer.pull(reference, **kwargs)

    async def ping(self) -> bool:
        try:
            await self.introspection.version()
        except errors.Unavailable:
            return False
        return True
