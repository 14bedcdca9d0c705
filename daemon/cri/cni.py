"""A CNI runtime: attaching pod sandboxes to the node's network, as containerd's CRI does.

The network comes from the first valid file of a config directory (``*.conf``,
``*.conflist``, ``*.json`` in lexical order; containerd's go-cni default of a single
network). Every pod also gets the ``loopback`` plugin for ``lo``, from a built-in list.

Plugins are executables found in the bin dirs and spoken to per the CNI spec (0.3.x,
0.4.0 and 1.0.0 results): the command and ids in ``CNI_*`` environment variables, the
network config on stdin, a result or an error object on stdout. Results of ADD are
cached on disk in libcni's format (``<cache_dir>/results/<net>-<id>-<ifname>``) so that
DEL, perhaps after a daemon restart, hands the plugins what ADD produced and so that a
network is torn down with the config it was set up with, even if the file changed.
"""
from __future__ import annotations

import asyncio
import base64
import errno
import ipaddress
import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from ctrd.errors import (
    CtrdError,
    DeadlineExceeded,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    Unknown,
)

from .netns import is_mounted

log = structlog.get_logger()

DEFAULT_CONF_DIR = Path("/etc/cni/net.d")
DEFAULT_BIN_DIRS = (Path("/opt/cni/bin"), Path("/usr/lib/cni"))
DEFAULT_CACHE_DIR = Path("/var/lib/cni")
CONF_EXTENSIONS = (".conf", ".conflist", ".json")
# Result formats this runtime reads; 0.1.0/0.2.0 results have another shape altogether.
SUPPORTED_VERSIONS = ("0.3.0", "0.3.1", "0.4.0", "1.0.0")
LOOPBACK_IFNAME = "lo"
# containerd's built-in loopback list; 0.3.1 so that any loopback plugin accepts it.
LOOPBACK_CONFLIST = b'{"cniVersion":"0.3.1","name":"cni-loopback","plugins":[{"type":"loopback"}]}'
CACHE_KIND = "cniCacheV1"
NOT_READY_REASON = "NetworkPluginNotReady"
# Exec of a plugin being replaced on disk fails with ETXTBSY for a moment; libcni retries.
_TEXT_BUSY_RETRIES = 5

# libcni's rule for container ids and network names; they become file names.
_NAME_RE = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9_.\-]*$")
_IFNAME_MAX = 15


# --- configuration ---------------------------------------------------------------------

@dataclass(frozen=True)
class PluginConf:
    """One plugin of a network list, its JSON object kept as written."""

    type: str
    raw: Mapping[str, Any]

    @property
    def capabilities(self) -> frozenset[str]:
        caps = self.raw.get("capabilities") or {}
        return frozenset(name for name, on in caps.items() if on is True)


@dataclass(frozen=True)
class NetworkConfList:
    name: str
    cni_version: str
    plugins: tuple[PluginConf, ...]
    # The list's bytes as loaded; the cache records them for teardown.
    source: bytes = field(repr=False)
    path: Path | None = None


class ConfigError(InvalidArgument):
    """A network config file or text that cannot be used."""


def _version_key(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.split("."))


def _check_name(what: str, value: object) -> str:
    if not isinstance(value, str) or not _NAME_RE.match(value):
        raise ConfigError(f"invalid {what} {value!r}: must match {_NAME_RE.pattern}")
    return value


def _plugin(index: int, raw: object) -> PluginConf:
    if not isinstance(raw, dict):
        raise ConfigError(f"plugin {index} is not a JSON object")
    ptype = raw.get("type")
    if not isinstance(ptype, str) or not ptype:
        raise ConfigError(f"plugin {index} has no 'type'")
    if "/" in ptype or ptype in (".", ".."):
        raise ConfigError(f"plugin {index} has an invalid type {ptype!r}")
    caps = raw.get("capabilities", {})
    if not isinstance(caps, dict):
        raise ConfigError(f"plugin {index} ({ptype}): 'capabilities' is not an object")
    return PluginConf(ptype, raw)


def _decode(data: bytes) -> dict[str, Any]:
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ConfigError(f"invalid JSON: {exc}") from exc
    if not isinstance(doc, dict):
        raise ConfigError("not a JSON object")
    return doc


def _version(doc: Mapping[str, Any]) -> str:
    version = doc.get("cniVersion", "")
    if version not in SUPPORTED_VERSIONS:
        raise ConfigError(
            f"unsupported cniVersion {version!r} (supported: {', '.join(SUPPORTED_VERSIONS)})")
    return version


def parse_conflist(data: bytes, path: Path | None = None) -> NetworkConfList:
    """A ``.conflist`` document: name, cniVersion and a non-empty ``plugins`` array."""
    doc = _decode(data)
    name = _check_name("network name", doc.get("name"))
    version = _version(doc)
    raw_plugins = doc.get("plugins")
    if not isinstance(raw_plugins, list) or not raw_plugins:
        raise ConfigError("'plugins' must be a non-empty array")
    plugins = tuple(_plugin(i, p) for i, p in enumerate(raw_plugins))
    return NetworkConfList(name, version, plugins, data, path)


def parse_conf(data: bytes, path: Path | None = None) -> NetworkConfList:
    """A single-plugin ``.conf``/``.json`` document, made a list of one as libcni does."""
    doc = _decode(data)
    if "plugins" in doc and "type" not in doc:
        raise ConfigError("a plugin list in a single-plugin file (name it .conflist)")
    name = _check_name("network name", doc.get("name"))
    version = _version(doc)
    plugin = _plugin(0, doc)
    wrapped = json.dumps({"name": name, "cniVersion": version, "plugins": [doc]}).encode()
    return NetworkConfList(name, version, (plugin,), wrapped, path)


def load_conf_dir(conf_dir: Path) -> NetworkConfList | None:
    """The first usable network config of ``conf_dir``; unusable files are logged and skipped."""
    try:
        entries = sorted(conf_dir.iterdir())
    except FileNotFoundError:
        return None
    for path in entries:
        if path.suffix not in CONF_EXTENSIONS or not path.is_file():
            continue
        try:
            data = path.read_bytes()
            if path.suffix == ".conflist":
                return parse_conflist(data, path)
            return parse_conf(data, path)
        except ConfigError as exc:
            log.warning("cni config skipped", file=str(path), error=str(exc))
        except OSError as exc:
            log.warning("cni config unreadable", file=str(path), error=str(exc))
    return None


def loopback_network() -> NetworkConfList:
    return parse_conflist(LOOPBACK_CONFLIST)


# --- results ---------------------------------------------------------------------------

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPInterface = ipaddress.IPv4Interface | ipaddress.IPv6Interface
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class Interface:
    name: str
    mac: str = ""
    # The netns path for interfaces inside the pod; empty for host-side ones (veth, bridge).
    sandbox: str = ""


@dataclass(frozen=True)
class IPConfig:
    address: IPInterface  # address with its prefix length
    gateway: IPAddress | None = None
    # Index into Result.interfaces of the interface holding the address.
    interface: int | None = None


@dataclass(frozen=True)
class Route:
    dst: IPNetwork
    gw: IPAddress | None = None


@dataclass(frozen=True)
class DNS:
    nameservers: tuple[str, ...] = ()
    domain: str = ""
    search: tuple[str, ...] = ()
    options: tuple[str, ...] = ()


@dataclass(frozen=True)
class Result:
    cni_version: str
    interfaces: tuple[Interface, ...] = ()
    ips: tuple[IPConfig, ...] = ()
    routes: tuple[Route, ...] = ()
    dns: DNS = DNS()

    def ips_of(self, ifname: str) -> list[IPConfig]:
        """Addresses of the pod interface ``ifname`` (those naming no interface count too)."""
        return [ip for ip in self.ips
                if ip.interface is None
                or (self.interfaces[ip.interface].name == ifname
                    and self.interfaces[ip.interface].sandbox)]

    def to_json(self, version: str | None = None) -> dict[str, Any]:
        """The result in the JSON shape of ``version`` (default: its own)."""
        version = version or self.cni_version
        pre_1 = _version_key(version) < (1, 0, 0)
        out: dict[str, Any] = {"cniVersion": version}
        if self.interfaces:
            out["interfaces"] = [
                {"name": i.name, **({"mac": i.mac} if i.mac else {}),
                 **({"sandbox": i.sandbox} if i.sandbox else {})}
                for i in self.interfaces]
        if self.ips:
            ips = []
            for ip in self.ips:
                entry: dict[str, Any] = {}
                if pre_1:
                    entry["version"] = str(ip.address.version)
                if ip.interface is not None:
                    entry["interface"] = ip.interface
                entry["address"] = str(ip.address)
                if ip.gateway is not None:
                    entry["gateway"] = str(ip.gateway)
                ips.append(entry)
            out["ips"] = ips
        if self.routes:
            out["routes"] = [{"dst": str(r.dst), **({"gw": str(r.gw)} if r.gw else {})}
                             for r in self.routes]
        dns = {k: v for k, v in (("nameservers", list(self.dns.nameservers)),
                                 ("domain", self.dns.domain),
                                 ("search", list(self.dns.search)),
                                 ("options", list(self.dns.options))) if v}
        if dns:
            out["dns"] = dns
        return out


class ResultError(Internal):
    """A plugin's output that is not a valid CNI result."""


def _strings(doc: Mapping[str, Any], key: str) -> tuple[str, ...]:
    value = doc.get(key) or []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ResultError(f"dns.{key} must be an array of strings")
    return tuple(value)


def _address(value: object, what: str) -> IPAddress | None:
    if value in (None, ""):
        return None
    try:
        return ipaddress.ip_address(value)  # type: ignore[arg-type]
    except ValueError as exc:
        raise ResultError(f"invalid {what} {value!r}") from exc


def parse_result(doc: object, cni_version: str = "") -> Result:
    """A CNI result (0.3.x/0.4.0/1.0.0 shape) from its decoded JSON.

    ``cni_version`` is the config's version, used when the result does not say its own."""
    if not isinstance(doc, dict):
        raise ResultError("result is not a JSON object")
    version = doc.get("cniVersion") or cni_version
    if version not in SUPPORTED_VERSIONS:
        raise ResultError(f"unsupported result version {version!r}")
    try:
        interfaces = tuple(
            Interface(str(i["name"]), str(i.get("mac", "")), str(i.get("sandbox", "")))
            for i in doc.get("interfaces") or [])
        ips = []
        for entry in doc.get("ips") or []:
            index = entry.get("interface")
            if index is not None and (not isinstance(index, int) or isinstance(index, bool)
                                      or not 0 <= index < len(interfaces)):
                raise ResultError(f"ip {entry.get('address')!r} names interface {index!r}, "
                                  f"but the result has {len(interfaces)} interfaces")
            try:
                address = ipaddress.ip_interface(entry["address"])
            except ValueError as exc:
                raise ResultError(f"invalid address {entry['address']!r}") from exc
            ips.append(IPConfig(address, _address(entry.get("gateway"), "gateway"), index))
        routes = []
        for entry in doc.get("routes") or []:
            try:
                dst = ipaddress.ip_network(entry["dst"], strict=False)
            except ValueError as exc:
                raise ResultError(f"invalid route destination {entry['dst']!r}") from exc
            routes.append(Route(dst, _address(entry.get("gw"), "route gateway")))
        raw_dns = doc.get("dns") or {}
        if not isinstance(raw_dns, dict):
            raise ResultError("dns is not an object")
        dns = DNS(_strings(raw_dns, "nameservers"), str(raw_dns.get("domain") or ""),
                  _strings(raw_dns, "search"), _strings(raw_dns, "options"))
    except (KeyError, TypeError, AttributeError) as exc:
        raise ResultError(f"malformed result: {type(exc).__name__}: {exc}") from exc
    return Result(version, interfaces, tuple(ips), tuple(routes), dns)


# --- runtime ---------------------------------------------------------------------------

@dataclass(frozen=True)
class PortMapping:
    """A ``portMappings`` capability entry (what the portmap plugin reads)."""

    host_port: int
    container_port: int
    protocol: str = "tcp"
    host_ip: str = ""

    def to_cni(self) -> dict[str, Any]:
        out: dict[str, Any] = {"hostPort": self.host_port, "containerPort": self.container_port,
                               "protocol": self.protocol.lower()}
        if self.host_ip:
            out["hostIP"] = self.host_ip
        return out


@dataclass(frozen=True)
class CNIOptions:
    conf_dir: Path = DEFAULT_CONF_DIR
    bin_dirs: tuple[Path, ...] = DEFAULT_BIN_DIRS
    # Results go to <cache_dir>/results, libcni's layout.
    cache_dir: Path = DEFAULT_CACHE_DIR
    plugin_timeout: float = 60.0


@dataclass(frozen=True)
class NetworkStatus:
    """CRI's NetworkReady condition."""

    ready: bool
    reason: str = ""
    message: str = ""


class PluginError(Unknown):
    """A plugin ran and reported failure (its CNI error object, or what it printed)."""

    def __init__(self, plugin: str, command: str, msg: str, code: int = 0,
                 details: str = "") -> None:
        self.plugin, self.command, self.msg, self.code, self.details = (
            plugin, command, msg, code, details)
        text = f"CNI plugin {plugin!r} failed ({command}): {msg}"
        if details:
            text += f": {details}"
        if code:
            text += f" (CNI error code {code})"
        super().__init__(text)


def pod_args(namespace: str, name: str, uid: str, sandbox_id: str) -> dict[str, str]:
    """The CNI_ARGS containerd's CRI passes for a pod."""
    return {
        "IgnoreUnknown": "1",
        "K8S_POD_NAMESPACE": namespace,
        "K8S_POD_NAME": name,
        "K8S_POD_INFRA_CONTAINER_ID": sandbox_id,
        "K8S_POD_UID": uid,
    }


def validate_container_id(container_id: str) -> None:
    if not container_id:
        raise InvalidArgument("missing container id")
    if not _NAME_RE.match(container_id):
        raise InvalidArgument(f"invalid characters in container id {container_id!r}")


def validate_ifname(ifname: str) -> None:
    if not ifname:
        raise InvalidArgument("interface name is empty")
    if len(ifname) > _IFNAME_MAX:
        raise InvalidArgument(f"interface name {ifname!r} is longer than {_IFNAME_MAX} characters")
    if ifname in (".", "..") or any(c in "/:" or c.isspace() for c in ifname):
        raise InvalidArgument(f"invalid interface name {ifname!r}")


def _validate_attachment(container_id: str, ifname: str) -> None:
    validate_container_id(container_id)
    validate_ifname(ifname)
    if ifname == LOOPBACK_IFNAME:
        raise InvalidArgument(f"interface name {ifname!r} is reserved for loopback")


def _cni_args(args: Mapping[str, str]) -> str:
    for key, value in args.items():
        if not key or any(c in key for c in "=;") or ";" in value:
            raise InvalidArgument(f"invalid CNI argument {key!r}={value!r}")
    return ";".join(f"{k}={v}" for k, v in args.items())


@dataclass(frozen=True)
class _Attachment:
    """One network list applied to one interface of one container."""

    container_id: str
    netns: str
    ifname: str
    args: Mapping[str, str]
    capabilities: Mapping[str, Any]


@dataclass(frozen=True)
class _CacheEntry:
    network: NetworkConfList
    args: dict[str, str]
    capabilities: dict[str, Any]
    result: Result | None
    path: Path


def plugin_config(network: NetworkConfList, plugin: PluginConf, prev: Result | None,
                  capabilities: Mapping[str, Any]) -> dict[str, Any]:
    """What one plugin of ``network`` reads on stdin (libcni's buildOneConfig).

    The list's name and version override the plugin's own; ``runtimeConfig`` carries only
    the capability arguments the plugin declares."""
    conf = dict(plugin.raw)
    conf["name"] = network.name
    conf["cniVersion"] = network.cni_version
    if prev is not None:
        conf["prevResult"] = prev.to_json(network.cni_version)
    runtime = {cap: capabilities[cap] for cap in sorted(plugin.capabilities)
               if cap in capabilities}
    if runtime:
        conf["runtimeConfig"] = runtime
    return conf


def _stdin(network: NetworkConfList, plugin: PluginConf, prev: Result | None,
           att: _Attachment) -> bytes:
    return json.dumps(plugin_config(network, plugin, prev, att.capabilities)).encode()


def _already_gone(exc: CtrdError, netns: str) -> bool:
    """Plugin errors on DEL that mean there was nothing left to remove (go-cni's test)."""
    if not isinstance(exc, PluginError):
        return False
    text = str(exc).lower()
    return "not found" in text or (not netns and "no such file or directory" in text)


class CNI:
    """The node's pod network: load its config, attach and detach pod sandboxes."""

    def __init__(self, options: CNIOptions = CNIOptions()) -> None:
        self.options = options
        self._network: NetworkConfList | None = None
        self._loopback = loopback_network()

    @property
    def network(self) -> NetworkConfList | None:
        return self._network

    async def load(self) -> NetworkConfList | None:
        """(Re)read the config directory; the network in use afterwards, if any."""
        network = await asyncio.to_thread(load_conf_dir, self.options.conf_dir)
        self._network = network
        if network is None:
            log.warning("no cni network config", conf_dir=str(self.options.conf_dir))
        else:
            log.info("cni network loaded", network=network.name, file=str(network.path),
                     plugins=[p.type for p in network.plugins])
        return network

    async def status(self) -> NetworkStatus:
        if self._network is None:
            return NetworkStatus(False, NOT_READY_REASON,
                                 "Network plugin returns error: cni plugin not initialized "
                                 f"(no valid network config in {self.options.conf_dir})")
        return NetworkStatus(True)

    async def setup(self, container_id: str, netns_path: str, *, ifname: str = "eth0",
                    args: Mapping[str, str] | None = None,
                    port_mappings: Sequence[PortMapping] = (),
                    capabilities: Mapping[str, Any] | None = None) -> Result:
        """Attach the pod's namespace: loopback on ``lo``, the network on ``ifname``.

        ``capabilities`` adds runtimeConfig entries beyond port mappings (``bandwidth``,
        ``dns``, ...); each plugin gets only those it declares. On failure everything
        already attached is detached again before the error is raised."""
        _validate_attachment(container_id, ifname)
        if not netns_path or not os.path.isabs(netns_path):
            raise InvalidArgument(f"netns path must be absolute, got {netns_path!r}")
        args = dict(args or {})
        _cni_args(args)
        network = self._network
        if network is None:
            raise FailedPrecondition(
                f"cni plugin not initialized: no valid network config in {self.options.conf_dir}")
        caps = dict(capabilities or {})
        if port_mappings:
            caps["portMappings"] = [pm.to_cni() for pm in port_mappings]
        bound = log.bind(container_id=container_id, network=network.name, ifname=ifname)
        try:
            await self._add_list(self._loopback, _Attachment(
                container_id, netns_path, LOOPBACK_IFNAME, args, caps))
            result = await self._add_list(network, _Attachment(
                container_id, netns_path, ifname, args, caps))
        except BaseException as exc:
            bound.warning("cni setup failed, detaching", error=str(exc))
            try:
                await self.teardown(container_id, netns_path, ifname=ifname, args=args,
                                    port_mappings=port_mappings, capabilities=capabilities)
            except CtrdError as cleanup:
                bound.warning("cni cleanup after failed setup", error=str(cleanup))
            raise
        bound.info("cni setup", ips=[str(ip.address) for ip in result.ips_of(ifname)])
        return result

    async def teardown(self, container_id: str, netns_path: str | None, *,
                       ifname: str = "eth0", args: Mapping[str, str] | None = None,
                       port_mappings: Sequence[PortMapping] | None = None,
                       capabilities: Mapping[str, Any] | None = None) -> None:
        """Detach the pod's namespace; safe to repeat and after the namespace is gone.

        The networks torn down are those the cache says were set up, else the current
        ones. Arguments left as None come from the cache. A namespace that no longer
        exists is passed as empty CNI_NETNS, which the spec allows for DEL. Errors that
        mean the thing is already gone are ignored; other failures are logged, the
        remaining plugins still run, and the first of them is raised at the end."""
        _validate_attachment(container_id, ifname)
        netns = netns_path or ""
        if netns and not await asyncio.to_thread(is_mounted, netns):
            netns = ""
        caps: dict[str, Any] | None = None
        if capabilities is not None or port_mappings is not None:
            caps = dict(capabilities or {})
            if port_mappings:
                caps["portMappings"] = [pm.to_cni() for pm in port_mappings]
        failures: list[CtrdError] = []
        for slot, current in ((ifname, self._network), (LOOPBACK_IFNAME, self._loopback)):
            entries = await asyncio.to_thread(self._cached, container_id, slot)
            if not entries:
                if current is None:
                    log.warning("cni teardown: no cached or configured network",
                                container_id=container_id, ifname=slot)
                    continue
                entries = [_CacheEntry(current, {}, {}, None, self._cache_path(
                    current.name, container_id, slot))]
            for entry in entries:
                attachment = _Attachment(
                    container_id, netns, slot,
                    dict(args) if args is not None else entry.args,
                    caps if caps is not None else entry.capabilities)
                failure = await self._del_list(entry.network, attachment, entry.result)
                if failure is None:
                    await asyncio.to_thread(entry.path.unlink, missing_ok=True)
                else:
                    failures.append(failure)
        if failures:
            raise failures[0]
        log.info("cni teardown", container_id=container_id, ifname=ifname)

    # -- plugin lists

    async def _add_list(self, network: NetworkConfList, att: _Attachment) -> Result:
        result: Result | None = None
        for plugin in network.plugins:
            out = await self._exec(plugin, "ADD", _stdin(network, plugin, result, att),
                                   att)
            try:
                result = parse_result(json.loads(out), network.cni_version)
            except ValueError as exc:
                raise ResultError(f"CNI plugin {plugin.type!r} (ADD) printed no valid JSON "
                                  f"result: {exc}") from exc
            except ResultError as exc:
                raise ResultError(f"CNI plugin {plugin.type!r} (ADD): {exc}") from exc
        if result is None:  # parse_conflist admits no empty list
            raise Internal(f"network {network.name!r} has no plugins")
        try:
            await asyncio.to_thread(self._store, network, att, result)
        except OSError as exc:
            raise Internal(f"cache CNI result of network {network.name!r}: {exc}") from exc
        return result

    async def _del_list(self, network: NetworkConfList, att: _Attachment,
                        cached: Result | None) -> CtrdError | None:
        # Before 0.4.0 DEL got no prevResult.
        prev = cached if _version_key(network.cni_version) >= (0, 4, 0) else None
        first: CtrdError | None = None
        for plugin in reversed(network.plugins):
            try:
                await self._exec(plugin, "DEL", _stdin(network, plugin, prev, att),
                                 att)
            except CtrdError as exc:
                if _already_gone(exc, att.netns):
                    log.debug("cni del: already gone", plugin=plugin.type, error=str(exc),
                              container_id=att.container_id)
                    continue
                log.error("cni del failed", plugin=plugin.type, network=network.name,
                          container_id=att.container_id, ifname=att.ifname, error=str(exc))
                first = first or exc
        return first

    # -- executing a plugin

    def _find(self, plugin: str) -> Path:
        for directory in self.options.bin_dirs:
            candidate = directory / plugin
            if candidate.is_file():
                return candidate
        raise FailedPrecondition(
            f"CNI plugin {plugin!r} not found in {', '.join(map(str, self.options.bin_dirs))}")

    async def _exec(self, plugin: PluginConf, command: str, stdin: bytes,
                    att: _Attachment) -> bytes:
        binary = await asyncio.to_thread(self._find, plugin.type)
        env = dict(os.environ)
        env.update({
            "CNI_COMMAND": command,
            "CNI_CONTAINERID": att.container_id,
            "CNI_NETNS": att.netns,
            "CNI_IFNAME": att.ifname,
            "CNI_ARGS": _cni_args(att.args),
            "CNI_PATH": os.pathsep.join(map(str, self.options.bin_dirs)),
        })
        for attempt in range(_TEXT_BUSY_RETRIES + 1):
            try:
                proc = await asyncio.create_subprocess_exec(
                    str(binary), stdin=asyncio.subprocess.PIPE,
                    stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env)
                break
            except OSError as exc:
                if exc.errno == errno.ETXTBSY and attempt < _TEXT_BUSY_RETRIES:
                    await asyncio.sleep(1)
                    continue
                raise FailedPrecondition(
                    f"CNI plugin {plugin.type!r}: cannot execute {binary}: {exc.strerror}") from exc
        try:
            stdout, stderr = await asyncio.wait_for(proc.communicate(stdin),
                                                    self.options.plugin_timeout)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise DeadlineExceeded(f"CNI plugin {plugin.type!r} ({command}) did not finish "
                                   f"within {self.options.plugin_timeout:g}s") from None
        except BaseException:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
            raise
        if stderr:
            log.debug("cni plugin stderr", plugin=plugin.type, command=command,
                      stderr=stderr.decode(errors="replace").strip())
        if proc.returncode != 0:
            raise _plugin_failure(plugin.type, command, proc.returncode, stdout, stderr)
        return stdout

    # -- result cache (libcni's file format, so either tool can tear down the other's pods)

    def _cache_path(self, network: str, container_id: str, ifname: str) -> Path:
        return self.options.cache_dir / "results" / f"{network}-{container_id}-{ifname}"

    def _store(self, network: NetworkConfList, att: _Attachment, result: Result) -> None:
        doc = {
            "kind": CACHE_KIND,
            "containerId": att.container_id,
            # Go marshals []byte as base64.
            "config": base64.b64encode(network.source).decode(),
            "ifName": att.ifname,
            "networkName": network.name,
            "cniArgs": [[k, v] for k, v in att.args.items()],
            "capabilityArgs": dict(att.capabilities),
            "result": result.to_json(),
        }
        path = self._cache_path(network.name, att.container_id, att.ifname)
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(doc, f)
        os.replace(tmp, path)

    def _cached(self, container_id: str, ifname: str) -> list[_CacheEntry]:
        """Cache entries of ``container_id`` on ``ifname``, any network."""
        directory = self.options.cache_dir / "results"
        suffix = f"-{container_id}-{ifname}"
        try:
            candidates = sorted(p for p in directory.iterdir() if p.name.endswith(suffix))
        except FileNotFoundError:
            return []
        entries = []
        for path in candidates:
            try:
                doc = json.loads(path.read_bytes())
                if (doc.get("kind") != CACHE_KIND or doc.get("containerId") != container_id
                        or doc.get("ifName") != ifname
                        or path.name != f"{doc.get('networkName')}{suffix}"):
                    continue
                network = parse_conflist(base64.b64decode(doc["config"]))
                raw_result = doc.get("result")
                result = parse_result(raw_result, network.cni_version) if raw_result else None
                args = {str(k): str(v) for k, v in doc.get("cniArgs") or []}
                caps = dict(doc.get("capabilityArgs") or {})
            except (OSError, ValueError, KeyError, TypeError, CtrdError) as exc:
                log.warning("cni cache entry unusable", file=str(path), error=str(exc))
                continue
            entries.append(_CacheEntry(network, args, caps, result, path))
        return entries


def _plugin_failure(plugin: str, command: str, status: int, stdout: bytes,
                    stderr: bytes) -> PluginError:
    text = stdout.strip()
    if text:
        try:
            doc = json.loads(text)
        except ValueError:
            doc = None
        if isinstance(doc, dict) and isinstance(doc.get("msg"), str):
            code = doc.get("code")
            return PluginError(plugin, command, doc["msg"],
                               code if isinstance(code, int) else 0, str(doc.get("details") or ""))
        return PluginError(plugin, command, f"exit status {status}, unparsable output "
                                            f"{text.decode(errors='replace')[:500]!r}")
    err = stderr.decode(errors="replace").strip()
    return PluginError(plugin, command, f"exit status {status}"
                                        + (f": {err[:500]}" if err else ", no error message"))
