"""Running CNI plugins for a pod sandbox: loopback on ``lo``, then the network on its ifname.

Plugins are executables in the bin dirs, driven per the CNI spec: the command and ids in
``CNI_*`` environment variables, the network config on stdin, a result or an error object
on stdout. ADD results are cached in libcni's format (``<cache_dir>/results/<net>-<id>-<ifname>``)
so that DEL, even after a daemon restart, gets what ADD produced and tears the network down
with the config it was set up with, even if the file has changed since.
"""
from __future__ import annotations

import asyncio
import base64
import errno
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
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

from ..netns import is_mounted
from .config import (
    _NAME_RE,
    NetworkConfList,
    PluginConf,
    load_conf_dir,
    loopback_network,
    parse_conflist,
)
from .result import Result, ResultError, _version_key, parse_result

log = structlog.get_logger()

DEFAULT_CONF_DIR = Path("/etc/cni/net.d")
DEFAULT_BIN_DIRS = (Path("/opt/cni/bin"), Path("/usr/lib/cni"))
DEFAULT_CACHE_DIR = Path("/var/lib/cni")
LOOPBACK_IFNAME = "lo"
CACHE_KIND = "cniCacheV1"
NOT_READY_REASON = "NetworkPluginNotReady"
# Exec of a plugin being replaced on disk fails with ETXTBSY for a moment; libcni retries.
_TEXT_BUSY_RETRIES = 5

_IFNAME_MAX = 15


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
