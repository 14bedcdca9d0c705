"""Daemon configuration: a TOML file, overridden by command-line flags.

The file format follows containerd's config.toml where the two overlap (``root``,
``state``, ``[grpc] address``, ``[metrics] address``, ``[plugins."<type>.<id>"]``),
so an operator who knows one knows the other.
"""
from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ctrd.errors import InvalidArgument

DEFAULT_ROOT = "/var/lib/ctrd"
DEFAULT_STATE = "/run/ctrd"
DEFAULT_ADDRESS = "/run/ctrd/ctrd.sock"

DEFAULT_TOML = f'''\
# ctrd configuration. Every key is optional; the values below are the defaults.
version = 2

# Persistent data: metadata database, content blobs, snapshots.
root = "{DEFAULT_ROOT}"
# Runtime data that does not survive a reboot: task bundles, shim sockets.
state = "{DEFAULT_STATE}"

[grpc]
  # Unix socket of the containerd-compatible gRPC API.
  # Shims send their events to the same path with ".ttrpc" appended.
  address = "{DEFAULT_ADDRESS}"
  # Owner of the socket; it is created with mode 0660, so members of `gid` may use it.
  uid = 0
  gid = 0
  max_recv_message_size = 16777216
  max_send_message_size = 16777216

[debug]
  # debug, info, warn or error.
  level = "info"
  # "console" for people, "json" for log collectors.
  format = "console"

[metrics]
  # host:port for Prometheus text metrics; empty disables the endpoint.
  # Keep it on loopback unless a firewall guards the port.
  address = ""

[timeouts]
  # How long a shim may take to answer its start-up handshake.
  "io.containerd.timeout.shim.load" = "5s"
  # How long SIGTERM waits for in-flight requests before closing.
  "io.containerd.timeout.shutdown" = "10s"

[plugins]
  [plugins."io.containerd.gc.v1.scheduler"]
    # Collect garbage this long after a deletion made some; deletions in between
    # share the run.
    schedule_delay = "100ms"

  [plugins."io.containerd.snapshotter.v1.overlayfs"]
    # No options yet; the table is where they will go.

  [plugins."io.containerd.runtime.v2.task"]
    # Which shim binary serves a runtime name. "io.containerd.runc.v2" maps to
    # containerd-shim-ctrd-v2 by default; set it to "containerd-shim-runc-v2" to use
    # containerd's own Go shim instead.
    [plugins."io.containerd.runtime.v2.task".shims]
      "io.containerd.runc.v2" = "containerd-shim-ctrd-v2"
      "io.containerd.runc.v1" = "containerd-shim-ctrd-v2"
      "io.containerd.ctrd.v2" = "containerd-shim-ctrd-v2"

  [plugins."io.containerd.transfer.v1.local"]
    # Registry hosts in containerd's layout: <config_path>/<host>/hosts.toml (mirrors,
    # CA and client certificates, skip_verify, plain HTTP).
    config_path = "/etc/ctrd/certs.d"
    # Docker-style config.json with registry logins; empty means none.
    credentials = ""
    # Hosts reached over plain HTTP (loopback registries already are).
    plain_http = []
    max_concurrent_downloads = 3
    max_concurrent_uploads = 3
    snapshotter = "overlayfs"
    connect_timeout = 30
    read_timeout = 60
    # Tries per request on network errors, 429 and 5xx, with backoff.
    attempts = 5
'''


def duration(text: str | int | float, key: str) -> float:
    """Seconds in a Go-style duration string ("5s", "250ms", "1m")."""
    if isinstance(text, (int, float)):
        return float(text)
    units = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
    for suffix in ("ms", "s", "m", "h"):
        if text.endswith(suffix):
            try:
                return float(text[: -len(suffix)]) * units[suffix]
            except ValueError:
                break
    raise InvalidArgument(f"config {key}: {text!r} is not a duration like 5s or 250ms")


@dataclass
class Config:
    root: str = DEFAULT_ROOT
    state: str = DEFAULT_STATE
    address: str = DEFAULT_ADDRESS
    uid: int = 0
    gid: int = 0
    max_recv_message_size: int = 16 << 20
    max_send_message_size: int = 16 << 20
    log_level: str = "info"
    log_format: str = "console"
    metrics_address: str = ""
    shim_load_timeout: float = 5.0
    shutdown_timeout: float = 10.0
    disabled_plugins: list[str] = field(default_factory=list)
    # Raw per-plugin tables keyed "<type>.<id>"; each plugin reads its own.
    plugins: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def ttrpc_address(self) -> str:
        return self.address + ".ttrpc"

    def plugin(self, uri: str) -> dict[str, Any]:
        return self.plugins.get(uri, {})

    @classmethod
    def load(cls, path: str | None) -> "Config":
        data = tomllib.loads(DEFAULT_TOML)
        if path:
            try:
                text = Path(path).read_text()
            except OSError as exc:
                raise InvalidArgument(f"config {path}: {exc.strerror}") from exc
            try:
                _merge(data, tomllib.loads(text))
            except tomllib.TOMLDecodeError as exc:
                raise InvalidArgument(f"config {path}: {exc}") from exc
        return cls.from_dict(data)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Config":
        grpc = data.get("grpc", {})
        debug = data.get("debug", {})
        timeouts = data.get("timeouts", {})
        cfg = cls(
            root=data.get("root", DEFAULT_ROOT),
            state=data.get("state", DEFAULT_STATE),
            address=grpc.get("address", DEFAULT_ADDRESS),
            uid=int(grpc.get("uid", 0)),
            gid=int(grpc.get("gid", 0)),
            max_recv_message_size=int(grpc.get("max_recv_message_size", 16 << 20)),
            max_send_message_size=int(grpc.get("max_send_message_size", 16 << 20)),
            log_level=debug.get("level", "info"),
            log_format=debug.get("format", "console"),
            metrics_address=data.get("metrics", {}).get("address", ""),
            shim_load_timeout=duration(
                timeouts.get("io.containerd.timeout.shim.load", "5s"), "shim.load"),
            shutdown_timeout=duration(
                timeouts.get("io.containerd.timeout.shutdown", "10s"), "shutdown"),
            disabled_plugins=list(data.get("disabled_plugins", [])),
            plugins=dict(data.get("plugins", {})),
        )
        if cfg.log_format not in ("console", "json"):
            raise InvalidArgument(f"config debug.format: {cfg.log_format!r} is not console or json")
        return cfg


def _merge(base: dict[str, Any], over: dict[str, Any]) -> None:
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = value
