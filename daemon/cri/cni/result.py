"""CNI results as plugins print them (0.3.x, 0.4.0 and 1.0.0 shapes), read and re-encoded."""
from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ctrd.errors import Internal

from .config import SUPPORTED_VERSIONS

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPInterface = ipaddress.IPv4Interface | ipaddress.IPv6Interface
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def _version_key(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.split("."))


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
