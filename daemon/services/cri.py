"""Kubernetes CRI v1: runtime.v1.RuntimeService and runtime.v1.ImageService.

Thin, as the other services: CRI's protobuf configs become the plain records of
:mod:`ctrd.daemon.cri.records`, the CRI core does the work, and its records become
protobuf again. RPCs this file does not define answer Unimplemented.
"""
from __future__ import annotations

import base64
import time
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping

from ctrd import __version__
from ctrd.api.k8s.cri.runtime.v1 import api_pb2 as pb
from ctrd.errors import FailedPrecondition, InvalidArgument, NotFound

from ..cri.images import ImageInfo
from ..cri.plugin import CRI
from ..cri.records import (
    Container,
    ContainerConfig,
    ContainerState,
    Mount,
    NamespaceMode,
    PortMapping,
    Resources,
    Sandbox,
    SandboxConfig,
    SandboxState,
)
from ..cri.stats import Usage
from ..cri.streaming.server import AttachTarget, ExecTarget, PortForwardTarget
from ..cri.streaming.streams import Options
from ..plugin import INTERNAL, InitContext
from ..remotes.auth import Credentials
from .interceptor import Registrar

RUNTIME_NAME = "ctrd"
API_VERSION = "v1"
_PROTOCOLS = {pb.TCP: "tcp", pb.UDP: "udp", pb.SCTP: "sctp"}
# Handlers a pod may ask for: the default, and the name containerd gives runc.
_HANDLERS = ("", "runc")


class RuntimeService:
    def __init__(self, cri: CRI) -> None:
        self.cri = cri
        self.runtime = cri.runtime

    def register(self, server: Registrar) -> None:
        server.add_service(pb.DESCRIPTOR.services_by_name["RuntimeService"], self)

    async def Version(self, request: pb.VersionRequest, context) -> pb.VersionResponse:
        return pb.VersionResponse(version="0.1.0", runtime_name=RUNTIME_NAME,
                                  runtime_version=__version__, runtime_api_version=API_VERSION)

    async def Status(self, request: pb.StatusRequest, context) -> pb.StatusResponse:
        network = await self.cri.network.status()
        return pb.StatusResponse(status=pb.RuntimeStatus(conditions=[
            pb.RuntimeCondition(type="RuntimeReady", status=True),
            pb.RuntimeCondition(type="NetworkReady", status=network.ready,
                                reason=network.reason, message=network.message),
        ]))

    async def RuntimeConfig(self, request: pb.RuntimeConfigRequest,
                            context) -> pb.RuntimeConfigResponse:
        # Containers' cgroups are paths in the cgroup tree (/k8s.io/<id>, or under the
        # pod's parent), not systemd units: kubelet must use its cgroupfs driver too.
        return pb.RuntimeConfigResponse(
            linux=pb.LinuxRuntimeConfiguration(cgroup_driver=pb.CGROUPFS))

    # -- pods -----------------------------------------------------------------------------

    async def RunPodSandbox(self, request: pb.RunPodSandboxRequest,
                            context) -> pb.RunPodSandboxResponse:
        if request.runtime_handler not in _HANDLERS:
            raise InvalidArgument(f"no runtime for handler {request.runtime_handler!r}")
        if not request.HasField("config"):
            raise InvalidArgument("sandbox config is required")
        config = _sandbox_config(request.config, request.runtime_handler)
        return pb.RunPodSandboxResponse(pod_sandbox_id=await self.runtime.run_pod(config))

    async def StopPodSandbox(self, request: pb.StopPodSandboxRequest,
                             context) -> pb.StopPodSandboxResponse:
        await self.runtime.stop_pod(request.pod_sandbox_id)
        return pb.StopPodSandboxResponse()

    async def RemovePodSandbox(self, request: pb.RemovePodSandboxRequest,
                               context) -> pb.RemovePodSandboxResponse:
        await self.runtime.remove_pod(request.pod_sandbox_id)
        return pb.RemovePodSandboxResponse()

    async def PodSandboxStatus(self, request: pb.PodSandboxStatusRequest,
                               context) -> pb.PodSandboxStatusResponse:
        sandbox = self.runtime.pod(request.pod_sandbox_id)
        return pb.PodSandboxStatusResponse(status=_sandbox_status(sandbox),
                                           timestamp=time.time_ns())

    async def ListPodSandbox(self, request: pb.ListPodSandboxRequest,
                             context) -> pb.ListPodSandboxResponse:
        f = request.filter if request.HasField("filter") else None
        items = []
        for sandbox in _pods(self.runtime.pods(), f):
            if f is not None and f.HasField("state") and f.state.state != sandbox.state:
                continue
            items.append(pb.PodSandbox(
                id=sandbox.id, metadata=_pod_metadata(sandbox), state=int(sandbox.state),
                created_at=sandbox.created_at, labels=sandbox.config.labels,
                annotations=sandbox.config.annotations,
                runtime_handler=sandbox.config.runtime_handler))
        return pb.ListPodSandboxResponse(items=items)

    async def PodSandboxStats(self, request: pb.PodSandboxStatsRequest,
                              context) -> pb.PodSandboxStatsResponse:
        sandbox = self.runtime.pod(request.pod_sandbox_id)
        return pb.PodSandboxStatsResponse(stats=await self._pod_stats(sandbox))

    async def ListPodSandboxStats(self, request: pb.ListPodSandboxStatsRequest,
                                  context) -> pb.ListPodSandboxStatsResponse:
        f = request.filter if request.HasField("filter") else None
        items = []
        for sandbox in _pods(self.runtime.pods(), f):
            if sandbox.state == SandboxState.READY:  # as containerd: ready pods only
                items.append(await self._pod_stats(sandbox))
        return pb.ListPodSandboxStatsResponse(stats=items)

    async def _pod_stats(self, sandbox: Sandbox) -> pb.PodSandboxStats:
        c = sandbox.config
        stats = pb.PodSandboxStats(attributes=pb.PodSandboxAttributes(
            id=sandbox.id, metadata=_pod_metadata(sandbox), labels=c.labels,
            annotations=c.annotations))
        usage = await self.runtime.pod_stats(sandbox.id)
        if usage is None:
            return stats
        linux = stats.linux
        _usage(linux.cpu, linux.memory, usage.total)
        linux.process.timestamp = usage.total.timestamp
        linux.process.process_count.value = usage.total.processes
        linux.network.timestamp = usage.total.timestamp
        for i, iface in enumerate(usage.interfaces):
            entry = pb.NetworkInterfaceUsage(
                name=iface.name, rx_bytes=pb.UInt64Value(value=iface.rx_bytes),
                rx_errors=pb.UInt64Value(value=iface.rx_errors),
                tx_bytes=pb.UInt64Value(value=iface.tx_bytes),
                tx_errors=pb.UInt64Value(value=iface.tx_errors))
            if i == 0 or iface.name == "eth0":
                linux.network.default_interface.CopyFrom(entry)
            linux.network.interfaces.append(entry)
        for container in self.runtime.list_containers():
            if container.id in usage.containers:
                linux.containers.append(_stats(container, usage.containers[container.id]))
        return stats

    async def GetContainerEvents(self, request: pb.GetEventsRequest,
                                 context) -> AsyncIterator[pb.ContainerEventResponse]:
        async for event in self.runtime.feed.subscribe():
            response = pb.ContainerEventResponse(
                container_id=event.id, container_event_type=int(event.kind),
                created_at=event.created_at)
            # The pod as it is now, with its containers: kubelet needs no extra call.
            try:
                sandbox = self.runtime.pod(event.sandbox_id)
            except NotFound:
                yield response
                continue
            response.pod_sandbox_status.CopyFrom(_sandbox_status(sandbox))
            response.containers_statuses.extend(
                _container_status(c) for c in self.runtime.list_containers()
                if c.sandbox_id == sandbox.id)
            yield response

    # -- containers -----------------------------------------------------------------------

    async def CreateContainer(self, request: pb.CreateContainerRequest,
                              context) -> pb.CreateContainerResponse:
        if not request.HasField("config"):
            raise InvalidArgument("container config is required")
        config = _container_config(request.config)
        id_ = await self.runtime.create_container(request.pod_sandbox_id, config)
        return pb.CreateContainerResponse(container_id=id_)

    async def StartContainer(self, request: pb.StartContainerRequest,
                             context) -> pb.StartContainerResponse:
        await self.runtime.containers.start(request.container_id)
        return pb.StartContainerResponse()

    async def StopContainer(self, request: pb.StopContainerRequest,
                            context) -> pb.StopContainerResponse:
        # A negative grace period means none, as containerd takes it.
        await self.runtime.containers.stop(request.container_id, max(request.timeout, 0))
        return pb.StopContainerResponse()

    async def RemoveContainer(self, request: pb.RemoveContainerRequest,
                              context) -> pb.RemoveContainerResponse:
        await self.runtime.containers.remove(request.container_id)
        return pb.RemoveContainerResponse()

    async def ListContainers(self, request: pb.ListContainersRequest,
                             context) -> pb.ListContainersResponse:
        f = request.filter if request.HasField("filter") else None
        items = []
        for c in _containers(self.runtime.list_containers(), f):
            if f is not None and f.HasField("state") and f.state.state != c.status.state:
                continue
            items.append(pb.Container(
                id=c.id, pod_sandbox_id=c.sandbox_id, metadata=_container_metadata(c),
                image=pb.ImageSpec(image=c.image_ref), image_ref=c.image_id,
                state=int(c.status.state), created_at=c.status.created_at,
                labels=c.config.labels, annotations=c.config.annotations,
                image_id=c.image_id))
        return pb.ListContainersResponse(containers=items)

    async def ContainerStatus(self, request: pb.ContainerStatusRequest,
                              context) -> pb.ContainerStatusResponse:
        return pb.ContainerStatusResponse(
            status=_container_status(self.runtime.container(request.container_id)))

    async def ReopenContainerLog(self, request: pb.ReopenContainerLogRequest,
                                 context) -> pb.ReopenContainerLogResponse:
        await self.runtime.containers.reopen_log(request.container_id)
        return pb.ReopenContainerLogResponse()

    # Exec and PortForward hand back a one-time URL of the streaming server, which
    # kubelet proxies the client to; the checks happen here, before any URL exists.
    async def Exec(self, request: pb.ExecRequest, context) -> pb.ExecResponse:
        container = self.runtime.container(request.container_id)
        if container.status.state != ContainerState.RUNNING:
            raise FailedPrecondition(f"container {container.id} is not running")
        if not request.cmd:
            raise InvalidArgument("cmd must not be empty")
        target = ExecTarget(container.id, tuple(request.cmd), _stream_options(request))
        return pb.ExecResponse(url=self.cri.streaming.url(target))

    async def Attach(self, request: pb.AttachRequest, context) -> pb.AttachResponse:
        container = self.runtime.container(request.container_id)
        if container.status.state != ContainerState.RUNNING:
            raise FailedPrecondition(f"container {container.id} is not running")
        if request.stdin and not container.config.stdin:
            raise InvalidArgument(f"container {container.id} was not created with stdin")
        if request.tty != container.config.tty:
            raise InvalidArgument(f"tty={request.tty} does not match the container's")
        target = AttachTarget(container.id, _stream_options(request))
        return pb.AttachResponse(url=self.cri.streaming.url(target))

    async def PortForward(self, request: pb.PortForwardRequest,
                          context) -> pb.PortForwardResponse:
        sandbox = self.runtime.pod(request.pod_sandbox_id)
        if sandbox.state != SandboxState.READY:
            raise FailedPrecondition(f"sandbox {sandbox.id} is not ready")
        for port in request.port:
            if not 0 < port < 65536:
                raise InvalidArgument(f"invalid port {port}")
        return pb.PortForwardResponse(url=self.cri.streaming.url(PortForwardTarget(sandbox.id)))

    async def UpdateContainerResources(self, request: pb.UpdateContainerResourcesRequest,
                                       context) -> pb.UpdateContainerResourcesResponse:
        if not request.HasField("linux"):
            raise InvalidArgument("linux resources are required")
        await self.runtime.containers.update_resources(request.container_id,
                                                       _resources(request.linux))
        return pb.UpdateContainerResourcesResponse()

    async def ContainerStats(self, request: pb.ContainerStatsRequest,
                             context) -> pb.ContainerStatsResponse:
        container = self.runtime.container(request.container_id)
        usage = await self.runtime.containers.stats(container.id)
        return pb.ContainerStatsResponse(stats=_stats(container, usage))

    async def ListContainerStats(self, request: pb.ListContainerStatsRequest,
                                 context) -> pb.ListContainerStatsResponse:
        f = request.filter if request.HasField("filter") else None
        items = []
        for c in _containers(self.runtime.list_containers(), f):
            if c.status.state != ContainerState.RUNNING:
                continue  # containerd lists the stats of running containers only
            items.append(_stats(c, await self.runtime.containers.stats(c.id)))
        return pb.ListContainerStatsResponse(stats=items)

    async def ExecSync(self, request: pb.ExecSyncRequest, context) -> pb.ExecSyncResponse:
        if not request.cmd:
            raise InvalidArgument("cmd must not be empty")
        # Zero or negative: no deadline, as containerd takes it.
        stdout, stderr, code = await self.runtime.containers.exec_sync(
            request.container_id, list(request.cmd), max(request.timeout, 0))
        return pb.ExecSyncResponse(stdout=stdout, stderr=stderr, exit_code=code)


class ImageService:
    def __init__(self, cri: CRI) -> None:
        self.images = cri.images

    def register(self, server: Registrar) -> None:
        server.add_service(pb.DESCRIPTOR.services_by_name["ImageService"], self)

    async def ListImages(self, request: pb.ListImagesRequest,
                         context) -> pb.ListImagesResponse:
        images = await self.images.list()
        wanted = request.filter.image.image if request.HasField("filter") else ""
        if wanted:
            try:
                match = await self.images.get(wanted)
            except NotFound:
                return pb.ListImagesResponse()
            images = [i for i in images if i.id == match.id]
        return pb.ListImagesResponse(images=[_image(i) for i in images])

    async def ImageStatus(self, request: pb.ImageStatusRequest,
                          context) -> pb.ImageStatusResponse:
        try:
            info = await self.images.get(request.image.image)
        except NotFound:
            return pb.ImageStatusResponse()  # CRI: a missing image is no error
        return pb.ImageStatusResponse(image=_image(info))

    async def PullImage(self, request: pb.PullImageRequest, context) -> pb.PullImageResponse:
        credentials = _credentials(request.auth) if request.HasField("auth") else None
        image_id = await self.images.pull(request.image.image, credentials)
        return pb.PullImageResponse(image_ref=image_id)

    async def RemoveImage(self, request: pb.RemoveImageRequest,
                          context) -> pb.RemoveImageResponse:
        await self.images.remove(request.image.image)
        return pb.RemoveImageResponse()

    async def ImageFsInfo(self, request: pb.ImageFsInfoRequest,
                          context) -> pb.ImageFsInfoResponse:
        mountpoint, used, inodes = await self.images.fs_usage()
        usage = pb.FilesystemUsage(timestamp=time.time_ns(),
                                   fs_id=pb.FilesystemIdentifier(mountpoint=mountpoint),
                                   used_bytes=pb.UInt64Value(value=used),
                                   inodes_used=pb.UInt64Value(value=inodes))
        return pb.ImageFsInfoResponse(image_filesystems=[usage])


# -- protobuf to records ------------------------------------------------------------------


def _mode(options: pb.NamespaceOption, name: str) -> NamespaceMode:
    value = getattr(options, name)
    try:
        mode = NamespaceMode(value)
    except ValueError:
        raise InvalidArgument(f"unknown {name} namespace mode {value}") from None
    if mode == NamespaceMode.TARGET:
        raise InvalidArgument(f"{name} namespace mode TARGET is not supported")
    return mode


def _sandbox_config(config: pb.PodSandboxConfig, handler: str) -> SandboxConfig:
    meta = config.metadata
    linux = config.linux
    security = linux.security_context
    options = security.namespace_options
    ports = []
    for p in config.port_mappings:
        if p.protocol not in _PROTOCOLS:
            raise InvalidArgument(f"unknown port protocol {p.protocol}")
        ports.append(PortMapping(_PROTOCOLS[p.protocol], p.container_port, p.host_port,
                                 p.host_ip))
    return SandboxConfig(
        name=meta.name, uid=meta.uid, namespace=meta.namespace, attempt=meta.attempt,
        hostname=config.hostname, log_directory=config.log_directory,
        dns_servers=list(config.dns_config.servers), dns_searches=list(config.dns_config.searches),
        dns_options=list(config.dns_config.options), port_mappings=ports,
        labels=dict(config.labels), annotations=dict(config.annotations),
        network=_mode(options, "network"), pid=_mode(options, "pid"), ipc=_mode(options, "ipc"),
        cgroup_parent=linux.cgroup_parent, sysctls=dict(linux.sysctls),
        privileged=security.privileged, runtime_handler=handler,
        seccomp=_seccomp(security.seccomp if security.HasField("seccomp") else None,
                         security.seccomp_profile_path))


def _container_config(config: pb.ContainerConfig) -> ContainerConfig:
    linux = config.linux
    security = linux.security_context
    res = linux.resources
    mounts = []
    for m in config.mounts:
        if m.propagation not in (0, 1, 2):
            raise InvalidArgument(f"unknown mount propagation {m.propagation}")
        mounts.append(Mount(m.container_path, m.host_path, m.readonly, m.propagation))
    return ContainerConfig(
        name=config.metadata.name, attempt=config.metadata.attempt, image=config.image.image,
        command=list(config.command), args=list(config.args), working_dir=config.working_dir,
        envs=[(e.key, e.value) for e in config.envs], mounts=mounts,
        labels=dict(config.labels), annotations=dict(config.annotations),
        log_path=config.log_path, stdin=config.stdin, stdin_once=config.stdin_once,
        tty=config.tty, resources=_resources(res),
        privileged=security.privileged,
        run_as_user=security.run_as_user.value if security.HasField("run_as_user") else None,
        run_as_group=security.run_as_group.value if security.HasField("run_as_group") else None,
        run_as_username=security.run_as_username, readonly_rootfs=security.readonly_rootfs,
        add_capabilities=list(security.capabilities.add_capabilities),
        drop_capabilities=list(security.capabilities.drop_capabilities),
        no_new_privs=security.no_new_privs, pid=_mode(security.namespace_options, "pid"),
        seccomp=_seccomp(security.seccomp if security.HasField("seccomp") else None,
                         security.seccomp_profile_path))


def _seccomp(profile: pb.SecurityProfile | None, legacy_path: str) -> str:
    """The seccomp choice in the string form of CRI's older seccomp_profile_path."""
    if profile is None:
        return legacy_path
    if profile.profile_type == pb.SecurityProfile.RuntimeDefault:
        return "runtime/default"
    if profile.profile_type == pb.SecurityProfile.Unconfined:
        return "unconfined"
    if profile.profile_type == pb.SecurityProfile.Localhost:
        return f"localhost/{profile.localhost_ref}"
    raise InvalidArgument(f"unknown seccomp profile type {profile.profile_type}")


def _stream_options(request: pb.ExecRequest | pb.AttachRequest) -> Options:
    """Which streams an Exec or Attach wants, refused as kubelet refuses them."""
    if request.tty and request.stderr:
        raise InvalidArgument("tty and stderr cannot both be true")
    if not (request.stdin or request.stdout or request.stderr):
        raise InvalidArgument("one of stdin, stdout, or stderr must be set")
    return Options(stdin=request.stdin, stdout=request.stdout, stderr=request.stderr,
                   tty=request.tty)


def _resources(res: pb.LinuxContainerResources) -> Resources:
    return Resources(cpu_period=res.cpu_period, cpu_quota=res.cpu_quota,
                     cpu_shares=res.cpu_shares, memory_limit=res.memory_limit_in_bytes,
                     oom_score_adj=res.oom_score_adj, cpuset_cpus=res.cpuset_cpus,
                     cpuset_mems=res.cpuset_mems)


def _resources_pb(res: Resources) -> pb.LinuxContainerResources:
    # containerd reports the swap limit equal to the memory limit (no swap beyond it).
    return pb.LinuxContainerResources(
        cpu_period=res.cpu_period, cpu_quota=res.cpu_quota, cpu_shares=res.cpu_shares,
        memory_limit_in_bytes=res.memory_limit, oom_score_adj=res.oom_score_adj,
        cpuset_cpus=res.cpuset_cpus, cpuset_mems=res.cpuset_mems,
        memory_swap_limit_in_bytes=res.memory_limit)


def _credentials(auth: pb.AuthConfig) -> Credentials | None:
    if auth.identity_token:
        return Credentials("", auth.identity_token)
    if auth.username:
        return Credentials(auth.username, auth.password)
    if auth.auth:
        try:
            user, _, secret = base64.b64decode(auth.auth, validate=True).decode().partition(":")
        except (ValueError, UnicodeDecodeError):
            raise InvalidArgument("auth is not base64 of user:password") from None
        return Credentials(user, secret)
    return None


# -- records to protobuf ------------------------------------------------------------------


def _labels_match(labels: Mapping[str, str], selector: Mapping[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def _pods(sandboxes: Iterable[Sandbox],
          f: pb.PodSandboxFilter | pb.PodSandboxStatsFilter | None) -> Iterator[Sandbox]:
    """The pods a filter's id (a prefix) and label selector let through."""
    for sandbox in sandboxes:
        if f is None or (sandbox.id.startswith(f.id)
                         and _labels_match(sandbox.config.labels, f.label_selector)):
            yield sandbox


def _containers(containers: Iterable[Container],
                f: pb.ContainerFilter | pb.ContainerStatsFilter | None) -> Iterator[Container]:
    """The containers a filter's id and pod (both prefixes) and label selector let through."""
    for c in containers:
        if f is None or (c.id.startswith(f.id) and c.sandbox_id.startswith(f.pod_sandbox_id)
                         and _labels_match(c.config.labels, f.label_selector)):
            yield c


def _pod_metadata(sandbox: Sandbox) -> pb.PodSandboxMetadata:
    c = sandbox.config
    return pb.PodSandboxMetadata(name=c.name, uid=c.uid, namespace=c.namespace,
                                 attempt=c.attempt)


def _container_metadata(container: Container) -> pb.ContainerMetadata:
    return pb.ContainerMetadata(name=container.config.name, attempt=container.config.attempt)


def _sandbox_status(sandbox: Sandbox) -> pb.PodSandboxStatus:
    c = sandbox.config
    options = pb.NamespaceOption(network=int(c.network), pid=int(c.pid), ipc=int(c.ipc))
    return pb.PodSandboxStatus(
        id=sandbox.id, metadata=_pod_metadata(sandbox), state=int(sandbox.state),
        created_at=sandbox.created_at,
        network=pb.PodSandboxNetworkStatus(
            ip=sandbox.ip, additional_ips=[pb.PodIP(ip=ip) for ip in sandbox.additional_ips]),
        linux=pb.LinuxPodSandboxStatus(namespaces=pb.Namespace(options=options)),
        labels=c.labels, annotations=c.annotations, runtime_handler=c.runtime_handler)


def _container_status(container: Container) -> pb.ContainerStatus:
    s = container.status
    c = container.config
    reason = s.reason
    if s.state == ContainerState.CREATED:
        reason = ""
    return pb.ContainerStatus(
        id=container.id, metadata=_container_metadata(container), state=int(s.state),
        created_at=s.created_at, started_at=s.started_at, finished_at=s.finished_at,
        exit_code=s.exit_code, image=pb.ImageSpec(image=container.image_ref),
        image_ref=container.image_id, reason=reason, message=s.message,
        labels=c.labels, annotations=c.annotations,
        mounts=[pb.Mount(container_path=m.container_path, host_path=m.host_path,
                         readonly=m.readonly, propagation=m.propagation) for m in c.mounts],
        log_path=container.log_path, image_id=container.image_id,
        resources=pb.ContainerResources(linux=_resources_pb(c.resources)))


def _stats(container: Container, usage: Usage | None) -> pb.ContainerStats:
    stats = pb.ContainerStats(attributes=pb.ContainerAttributes(
        id=container.id, metadata=_container_metadata(container),
        labels=container.config.labels, annotations=container.config.annotations))
    if usage is not None:
        _usage(stats.cpu, stats.memory, usage)
    return stats


def _usage(cpu: pb.CpuUsage, memory: pb.MemoryUsage, usage: Usage) -> None:
    cpu.timestamp = usage.timestamp
    cpu.usage_core_nano_seconds.value = usage.cpu_ns
    memory.timestamp = usage.timestamp
    memory.working_set_bytes.value = usage.working_set
    memory.usage_bytes.value = usage.memory_usage
    memory.rss_bytes.value = usage.rss
    memory.page_faults.value = usage.page_faults
    memory.major_page_faults.value = usage.major_page_faults
    if usage.available is not None:
        memory.available_bytes.value = usage.available


def _image(info: ImageInfo) -> pb.Image:
    image = pb.Image(id=info.id, repo_tags=info.repo_tags, repo_digests=info.repo_digests,
                     size=info.size, username=info.username)
    if info.uid is not None:
        image.uid.value = info.uid
    return image


class CRIServices:
    """Both CRI services, registered together as containerd's one CRI plugin."""

    def __init__(self, cri: CRI) -> None:
        self.services = (RuntimeService(cri), ImageService(cri))

    def register(self, server: Registrar) -> None:
        for service in self.services:
            service.register(server)


def init(ctx: InitContext) -> CRIServices:
    return CRIServices(ctx.get(INTERNAL, "cri"))
