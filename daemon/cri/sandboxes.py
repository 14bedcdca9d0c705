"""Pod sandboxes: a network namespace set up by CNI, and a pause process holding it.

The steps follow containerd 1.6's RunPodSandbox: reserve the name, have the sandbox
image, make the netns and run the CNI ADD, write the pod's hostname/hosts/resolv.conf,
prepare a snapshot, create the containerd container and its task, start it. Any step
failing undoes the ones before, so a failed RunPodSandbox leaves nothing behind.
Stop tears the network down and kills every process of the pod; it may be called
again and again. Remove deletes what is left.
"""
from __future__ import annotations

import asyncio
import os
import re
import secrets
import shutil
import signal
import time
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import structlog

from ctrd.errors import CtrdError, FailedPrecondition, InvalidArgument, NotFound
from ctrd.oci import spec as oci

from ..metadata.containers import OCI_SPEC_TYPE, AnyValue
from ..metadata.containers import Container as Record
from ..runtime.shim_manager import CreateOpts, TaskManager
from ..runtime.task import IO
from . import cni, netns, specs
from .cleanup import delete_task, remove_snapshot
from .config import NAMESPACE, CRIConfig
from .events import EventFeed, EventKind
from .images import CRIImages, ImageInfo
from .mounts import to_proto
from .records import NamespaceMode, Sandbox, SandboxConfig, SandboxState
from .store import CRIStore

log = structlog.get_logger()

# What a pod's hostname must look like before it becomes a file and the UTS name.
_HOSTNAME = re.compile(r"^[a-zA-Z0-9]([a-zA-Z0-9.-]{0,62})?$")
STOP_WAIT = 10.0
# The pod's interface CNI sets up, as kubelet and containerd name it.
POD_IFNAME = "eth0"


def sandbox_name(config: SandboxConfig) -> str:
    return f"k8s_POD_{config.name}_{config.namespace}_{config.uid}_{config.attempt}"


def _validate(config: SandboxConfig) -> None:
    for what, value in (("name", config.name), ("uid", config.uid),
                        ("namespace", config.namespace)):
        if not value:
            raise InvalidArgument(f"sandbox config must include metadata {what}")
    if config.hostname and not _HOSTNAME.match(config.hostname):
        raise InvalidArgument(f"invalid hostname {config.hostname!r}")
    if config.log_directory and not config.log_directory.startswith("/"):
        raise InvalidArgument(f"log directory {config.log_directory!r} must be absolute")
    for mapping in config.port_mappings:
        if not 0 <= mapping.host_port <= 65535 or not 0 < mapping.container_port <= 65535:
            raise InvalidArgument(f"invalid port mapping {mapping}")


class SandboxManager:
    def __init__(self, config: CRIConfig, store: CRIStore, images: CRIImages,
                 snapshots: Any, tasks: TaskManager, network: cni.CNI,
                 feed: EventFeed) -> None:
        self.config = config
        self.store = store
        self.images = images
        self.snapshots = snapshots
        self.tasks = tasks
        self.network = network
        self.feed = feed

    def files(self, id_: str) -> Path:
        """The folder of a pod's hostname, hosts and resolv.conf files."""
        return self.config.root / "sandboxes" / id_

    # -- run ------------------------------------------------------------------------------

    async def run(self, config: SandboxConfig) -> str:
        _validate(config)
        id_ = secrets.token_hex(32)
        name = sandbox_name(config)
        self.store.reserve(name, id_)
        sandbox = Sandbox(id=id_, name=name, config=config, created_at=time.time_ns())
        bound = log.bind(sandbox=id_, pod=config.name, pod_namespace=config.namespace)
        async with AsyncExitStack() as undo:
            undo.callback(self.store.release, name)
            image = await self._sandbox_image()
            files = self.files(id_)
            await asyncio.to_thread(_write_pod_files, files, config)
            undo.push_async_callback(asyncio.to_thread, shutil.rmtree, files, True)
            if config.network != NamespaceMode.NODE:
                await self._setup_network(sandbox, undo)
            mounts = await self.snapshots.prepare(NAMESPACE, self.config.snapshotter, id_,
                                                  image.chain_id, {})
            undo.push_async_callback(remove_snapshot, self.snapshots,
                                     self.config.snapshotter, id_)
            spec = await asyncio.to_thread(specs.sandbox_spec, sandbox, image.config, files,
                                           NAMESPACE, self.config.oom_floor())
            record = Record(id=id_, runtime_name=self.config.runtime,
                            spec=AnyValue(OCI_SPEC_TYPE, oci.dumps(spec)),
                            image=self.config.sandbox_image, snapshotter=self.config.snapshotter,
                            snapshot_key=id_, labels=dict(config.labels))
            await self.store.add_sandbox(sandbox, record)
            undo.push_async_callback(self.store.remove, sandbox)
            opts = CreateOpts(spec=oci.dumps(spec), runtime=self.config.runtime, io=IO(),
                              rootfs=to_proto(mounts))
            task, pid = await self.tasks.create(NAMESPACE, id_, opts)
            undo.push_async_callback(delete_task, self.tasks, id_)
            await task.start()
            sandbox.pid = pid
            sandbox.state = SandboxState.READY
            await self.store.save(sandbox)
            undo.pop_all()
        self.feed.publish(id_, id_, EventKind.CREATED)
        self.feed.publish(id_, id_, EventKind.STARTED)
        bound.info("sandbox running", ip=sandbox.ip, pid=sandbox.pid)
        return id_

    async def _sandbox_image(self) -> ImageInfo:
        try:
            return await self.images.get(self.config.sandbox_image)
        except NotFound:
            log.info("pulling sandbox image", image=self.config.sandbox_image)
            await self.images.pull(self.config.sandbox_image)
            return await self.images.get(self.config.sandbox_image)

    async def _setup_network(self, sandbox: Sandbox, undo: AsyncExitStack) -> None:
        ns = await netns.create(self.config.netns_dir)
        undo.push_async_callback(netns.remove, ns.path)
        sandbox.netns_path = str(ns.path)
        config = sandbox.config
        result = await self.network.setup(
            sandbox.id, sandbox.netns_path, args=_cni_args(sandbox),
            port_mappings=_port_mappings(config))
        undo.push_async_callback(self._teardown_network, sandbox)
        ips = [str(ip.address.ip) for ip in result.ips_of(POD_IFNAME)]
        if ips:
            sandbox.ip, sandbox.additional_ips = ips[0], ips[1:]

    # -- stop and remove ------------------------------------------------------------------

    async def stop(self, id_: str, stop_containers: Any) -> None:
        """Kill the pod's processes and free its network; a stopped pod is left as it is."""
        sandbox = self.store.sandbox(id_)
        async with self.store.lock(sandbox.id):
            await stop_containers(sandbox.id)
            await self._release(sandbox)
            # The address went back to the pool with the network: no longer the pod's.
            sandbox.ip, sandbox.additional_ips = "", []
            if sandbox.state != SandboxState.NOTREADY:
                sandbox.state = SandboxState.NOTREADY
                await self.store.save(sandbox)
                self.feed.publish(sandbox.id, sandbox.id, EventKind.STOPPED)
        log.info("sandbox stopped", sandbox=sandbox.id)

    async def remove(self, id_: str, remove_containers: Any) -> None:
        try:
            sandbox = self.store.sandbox(id_)
        except NotFound:
            return  # removing twice is fine, as CRI asks
        await remove_containers(sandbox.id)
        async with self.store.lock(sandbox.id):
            await self._release(sandbox)
            await remove_snapshot(self.snapshots, self.config.snapshotter, sandbox.id)
            await asyncio.to_thread(shutil.rmtree, self.files(sandbox.id), True)
            await self.store.remove(sandbox)
        self.feed.publish(sandbox.id, sandbox.id, EventKind.DELETED)
        log.info("sandbox removed", sandbox=sandbox.id)

    async def _release(self, sandbox: Sandbox) -> None:
        """Kill the pod's processes, then free its network (both idempotent)."""
        await self._kill(sandbox)
        if sandbox.netns_path:
            await self._teardown_network(sandbox)
            await netns.remove(sandbox.netns_path)

    async def _kill(self, sandbox: Sandbox) -> None:
        try:
            task = self.tasks.get(NAMESPACE, sandbox.id)
        except NotFound:
            return
        try:
            await task.kill(signal.SIGKILL, all_=True)
        except (NotFound, FailedPrecondition):
            pass  # already stopped
        try:
            await asyncio.wait_for(task.wait(), STOP_WAIT)
        except (TimeoutError, CtrdError) as exc:
            log.warning("sandbox task did not report its exit", sandbox=sandbox.id,
                        error=str(exc) or type(exc).__name__)
        await delete_task(self.tasks, sandbox.id)


    async def _teardown_network(self, sandbox: Sandbox) -> None:
        await self.network.teardown(sandbox.id, sandbox.netns_path, args=_cni_args(sandbox),
                                    port_mappings=_port_mappings(sandbox.config))


    async def on_exit(self, id_: str) -> None:
        """The pause process ended (killed, or the pod's cgroup ran out of memory)."""
        sandbox = self.store.sandboxes.get(id_)
        if sandbox is None:
            return
        async with self.store.lock(id_):
            if sandbox.state == SandboxState.NOTREADY:
                return
            sandbox.state = SandboxState.NOTREADY
            await self.store.save(sandbox)
            await delete_task(self.tasks, id_)
            self.feed.publish(id_, id_, EventKind.STOPPED)
        log.info("sandbox exited", sandbox=id_)

    async def recover(self) -> None:
        """After a restart: a pod whose pause task is gone is not ready any more."""
        for sandbox in list(self.store.sandboxes.values()):
            if sandbox.state != SandboxState.READY:
                continue
            try:
                state = await self.tasks.get(NAMESPACE, sandbox.id).state()
                alive = state.status in (2, 4)  # RUNNING, PAUSED
            except CtrdError:
                alive = False
            if not alive:
                await self.on_exit(sandbox.id)

    async def connect(self, id_: str,
                      port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """A TCP connection to ``port`` on the pod's loopback, made inside its network
        namespace (port forwarding): the socket keeps the namespace it was made in."""
        sandbox = self.store.sandbox(id_)
        if sandbox.state != SandboxState.READY:
            raise FailedPrecondition(f"sandbox {sandbox.id} is not ready")
        if not 0 < port < 65536:
            raise InvalidArgument(f"invalid port {port}")
        if not sandbox.netns_path:
            return await asyncio.open_connection("127.0.0.1", port)
        sock = await asyncio.to_thread(netns.socket_in, sandbox.netns_path)
        try:
            sock.setblocking(False)
            await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
        except OSError:
            sock.close()
            raise
        return await asyncio.open_connection(sock=sock)

    def list(self) -> list[Sandbox]:
        return sorted(self.store.sandboxes.values(), key=lambda s: s.created_at)


def _cni_args(sandbox: Sandbox) -> dict[str, str]:
    config = sandbox.config
    return cni.pod_args(config.namespace, config.name, config.uid, sandbox.id)


def _port_mappings(config: SandboxConfig) -> list[cni.PortMapping]:
    # A mapping without a host port publishes nothing (CRI says so), as in containerd.
    return [cni.PortMapping(m.host_port, m.container_port, m.protocol, m.host_ip)
            for m in config.port_mappings if m.host_port]


def _write_pod_files(folder: Path, config: SandboxConfig) -> None:
    folder.mkdir(parents=True, exist_ok=True, mode=0o755)
    hostname = config.hostname or os.uname().nodename
    (folder / "hostname").write_text(hostname + "\n")
    if config.network == NamespaceMode.NODE:
        hosts = _read("/etc/hosts")
    else:
        hosts = "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n"
    (folder / "hosts").write_text(hosts)
    if config.dns_servers or config.dns_searches or config.dns_options:
        lines = [f"nameserver {s}" for s in config.dns_servers]
        if config.dns_searches:
            lines.append("search " + " ".join(config.dns_searches))
        if config.dns_options:
            lines.append("options " + " ".join(config.dns_options))
        resolv = "\n".join(lines) + "\n"
    else:
        resolv = _read("/etc/resolv.conf")
    (folder / "resolv.conf").write_text(resolv)


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""
