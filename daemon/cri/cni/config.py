"""Network configuration: the network list pods attach to, and the built-in loopback list.

The network comes from the first usable file of the config directory (``*.conf``,
``*.conflist``, ``*.json`` in lexical order), as go-cni does by default: one network only.
"""
from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from ctrd.errors import InvalidArgument

log = structlog.get_logger()

CONF_EXTENSIONS = (".conf", ".conflist", ".json")
# Result formats this runtime reads; 0.1.0/0.2.0 results have another shape altogether.
SUPPORTED_VERSIONS = ("0.3.0", "0.3.1", "0.4.0", "1.0.0")
# containerd's built-in loopback list; 0.3.1 so that any loopback plugin accepts it.
LOOPBACK_CONFLIST = b'{"cniVersion":"0.3.1","name":"cni-loopback","plugins":[{"type":"loopback"}]}'

# libcni's rule for container ids and network names; they become file names.
_NAME_RE = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9_.\-]*$")


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
