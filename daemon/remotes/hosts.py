"""Which endpoints serve a registry, and how to talk to each: containerd's certs.d layout.

For a registry name such as ``registry.example:5000`` the directory
``<config_dir>/registry.example:5000/`` (or ``registry.example_5000_``, or ``_default``)
may hold a ``hosts.toml``::

    server = "https://registry.example:5000"     # the upstream, tried last
    ca = "ca.crt"                                 # relative to the directory
    [host."https://mirror.local"]                 # mirrors, tried first, in file order
      capabilities = ["pull", "resolve"]
      client = [["client.cert", "client.key"]]
      skip_verify = false
      [host."https://mirror.local".header]
        x-custom = "value"

Without ``hosts.toml`` the directory's ``*.crt`` files are CAs and ``*.cert``/``*.key``
pairs are client certificates (Docker's certs.d convention). Without any directory,
``docker.io`` means ``https://registry-1.docker.io`` and loopback hosts are plain HTTP.
"""
from __future__ import annotations

import ipaddress
import os
import ssl
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import structlog

from ctrd.errors import InvalidArgument

log = structlog.get_logger()

DEFAULT_CONFIG_DIR = "/etc/ctrd/certs.d"
PULL, RESOLVE, PUSH = "pull", "resolve", "push"
ALL_CAPABILITIES = frozenset({PULL, RESOLVE, PUSH})


@dataclass(frozen=True)
class TLSSettings:
    """What makes one endpoint's TLS differ from the system default."""

    ca_certs: tuple[str, ...] = ()
    client_pairs: tuple[tuple[str, str], ...] = ()  # (cert, key); key "" means in the cert file
    skip_verify: bool | None = None

    @property
    def is_default(self) -> bool:
        return not self.ca_certs and not self.client_pairs and self.skip_verify is None

    def context(self) -> ssl.SSLContext:
        """An SSL context for these settings (system CAs plus the configured ones)."""
        ctx = ssl.create_default_context()
        if self.skip_verify:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        for ca in self.ca_certs:
            try:
                ctx.load_verify_locations(cafile=ca)
            except (OSError, ssl.SSLError) as exc:
                raise InvalidArgument(f"unable to load CA cert {ca!r}: {exc}") from exc
        for cert, key in self.client_pairs:
            try:
                ctx.load_cert_chain(cert, key or None)
            except (OSError, ssl.SSLError) as exc:
                raise InvalidArgument(f"unable to load client certificate {cert!r}: {exc}") from exc
        return ctx


@dataclass(frozen=True)
class RegistryHost:
    """One endpoint that can serve a registry: the upstream itself or a mirror."""

    scheme: str
    host: str
    path: str = "/v2"
    capabilities: frozenset[str] = ALL_CAPABILITIES
    tls: TLSSettings = TLSSettings()
    headers: tuple[tuple[str, str], ...] = ()

    @property
    def base_url(self) -> str:
        return f"{self.scheme}://{self.host}{self.path}"

    def can(self, capability: str) -> bool:
        return capability in self.capabilities


def is_localhost(host: str) -> bool:
    """``localhost`` or a loopback address, with or without a port."""
    name = _strip_port(host)
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name.strip("[]")).is_loopback
    except ValueError:
        return False


def _strip_port(host: str) -> str:
    if host.startswith("["):
        end = host.find("]")
        return host[: end + 1] if end != -1 else host
    name, sep, port = host.rpartition(":")
    return name if sep and port.isdigit() else host


@dataclass
class HostsConfig:
    """Finds and reads the hosts configuration of registries.

    ``default_scheme`` forces a scheme for registries without configuration ("http" is
    what ``--plain-http`` asks for); ``plain_http`` lists registries always spoken to
    over HTTP.
    """

    config_dir: str | None = DEFAULT_CONFIG_DIR
    default_scheme: str = ""
    plain_http: frozenset[str] = field(default_factory=frozenset)

    def host_dir(self, registry: str) -> Path | None:
        if not self.config_dir:
            return None
        root = Path(self.config_dir)
        candidates = []
        name, sep, port = registry.rpartition(":")
        if sep and port.isdigit():
            candidates.append(root / f"{name}_{port}_")
        candidates += [root / registry, root / "_default"]
        for candidate in candidates:
            if candidate.is_dir():
                return candidate
        return None

    def hosts(self, registry: str) -> list[RegistryHost]:
        """Endpoints for ``registry`` in the order to try them (mirrors first)."""
        directory = self.host_dir(registry)
        configured = _load_dir(directory) if directory is not None else []
        if not configured:
            configured = [_Partial()]
        last = configured[-1]
        if not last.host:
            last.host, last.scheme, skip = self._default_endpoint(registry)
            if skip is not None and last.skip_verify is None:
                last.skip_verify = skip
            last.path = "/v2"
        return [p.build() for p in configured]

    def _default_endpoint(self, registry: str) -> tuple[str, str, bool | None]:
        if registry == "docker.io":
            return "registry-1.docker.io", "https", None
        if registry in self.plain_http:
            return registry, "http", None
        if is_localhost(registry) and self.default_scheme in ("", "http"):
            # Like containerd: loopback registries are plain HTTP unless told otherwise.
            return registry, "http", True
        return registry, self.default_scheme or "https", None


@dataclass
class _Partial:
    """A host entry while it is being read; :meth:`build` freezes it."""

    scheme: str = ""
    host: str = ""
    path: str = ""
    capabilities: frozenset[str] = ALL_CAPABILITIES
    ca_certs: list[str] = field(default_factory=list)
    client_pairs: list[tuple[str, str]] = field(default_factory=list)
    skip_verify: bool | None = None
    headers: list[tuple[str, str]] = field(default_factory=list)

    def build(self) -> RegistryHost:
        return RegistryHost(
            scheme=self.scheme, host=self.host, path=self.path or "/v2",
            capabilities=self.capabilities,
            tls=TLSSettings(tuple(self.ca_certs), tuple(self.client_pairs), self.skip_verify),
            headers=tuple(self.headers))


def _load_dir(directory: Path) -> list[_Partial]:
    hosts_file = directory / "hosts.toml"
    try:
        text = hosts_file.read_text()
    except FileNotFoundError:
        text = ""
    if not text.strip():
        return _load_cert_files(directory)
    try:
        return _parse_hosts_file(directory, tomllib.loads(text))
    except (tomllib.TOMLDecodeError, InvalidArgument) as exc:
        # A broken hosts.toml must not silently send traffic elsewhere; say so loudly.
        raise InvalidArgument(f"{hosts_file}: {exc}") from exc


def _load_cert_files(directory: Path) -> list[_Partial]:
    entry = _Partial()
    for name in sorted(os.listdir(directory)):
        path = directory / name
        if path.is_dir():
            continue
        if name.endswith(".crt"):
            entry.ca_certs.append(str(path))
        elif name.endswith(".cert"):
            key = directory / (name[: -len(".cert")] + ".key")
            entry.client_pairs.append((str(path), str(key) if key.exists() else ""))
    return [entry]


def _parse_hosts_file(directory: Path, data: dict[str, Any]) -> list[_Partial]:
    hosts = data.get("host", {})
    if not isinstance(hosts, dict):
        raise InvalidArgument("`host` must be a table of tables")
    # tomllib keeps the file's order, which is the order mirrors are tried in.
    result = [_parse_entry(directory, server, cfg) for server, cfg in hosts.items()]
    result.append(_parse_entry(directory, data.get("server", ""), data))
    return result


def _parse_entry(directory: Path, server: str, cfg: dict[str, Any]) -> _Partial:
    if not isinstance(cfg, dict):
        raise InvalidArgument(f"host {server!r} must be a table")
    entry = _Partial()
    if server:
        if not server.startswith("http"):
            server = "https://" + server
        parts = urlsplit(server)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise InvalidArgument(f"unable to parse server {server!r}")
        entry.scheme, entry.host = parts.scheme, parts.netloc
        path = os.path.normpath(parts.path) if parts.path else ""
        override = bool(cfg.get("override_path", False))
        if path and path != "/":
            entry.path = path if path.endswith("/v2") or override else path + "/v2"
        else:
            entry.path = "" if override else "/v2"
    caps = cfg.get("capabilities")
    if caps is not None:
        unknown = [c for c in caps if str(c).lower() not in ALL_CAPABILITIES]
        if unknown:
            raise InvalidArgument(f"unknown capability {unknown[0]!r}")
        entry.capabilities = frozenset(str(c).lower() for c in caps)
    if "skip_verify" in cfg:
        entry.skip_verify = bool(cfg["skip_verify"])
    entry.ca_certs = [_abs(directory, p) for p in _strings(cfg.get("ca"), "ca")]
    client = cfg.get("client")
    if isinstance(client, str):
        entry.client_pairs = [(_abs(directory, client), "")]
    elif isinstance(client, list):
        for item in client:
            if isinstance(item, str):
                entry.client_pairs.append((_abs(directory, item), ""))
            elif isinstance(item, list) and len(item) == 2 \
                    and all(isinstance(i, str) for i in item):
                entry.client_pairs.append((_abs(directory, item[0]), _abs(directory, item[1])))
            else:
                raise InvalidArgument(f"invalid pair {item!r} for \"client\"")
    elif client is not None:
        raise InvalidArgument(f"invalid type {type(client).__name__} for \"client\"")
    for key, value in (cfg.get("header") or {}).items():
        for item in _strings(value, f"header {key!r}"):
            entry.headers.append((key, item))
    return entry


def _strings(value: Any, what: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return list(value)
    raise InvalidArgument(f"invalid type {type(value).__name__} for {what}")


def _abs(directory: Path, path: str) -> str:
    return path if os.path.isabs(path) else str(directory / path)
