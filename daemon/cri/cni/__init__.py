"""A CNI runtime attaching pod sandboxes to the node's network, as containerd's CRI does.

``config`` picks the network list (first usable file of the conf dir) and holds the built-in
loopback list; ``result`` reads and writes plugin results (CNI 0.3.x to 1.0.0); ``runtime``
execs the plugins per the CNI spec and caches ADD results in libcni's on-disk format, so
that DEL, even after a restart, undoes exactly what ADD did.
"""
from .config import ConfigError, load_conf_dir, loopback_network, parse_conf, parse_conflist
from .result import ResultError, Route, parse_result
from .runtime import (
    CNI,
    CNIOptions,
    PluginError,
    PortMapping,
    plugin_config,
    pod_args,
    validate_container_id,
    validate_ifname,
)

__all__ = [
    "CNI",
    "CNIOptions",
    "ConfigError",
    "PluginError",
    "PortMapping",
    "ResultError",
    "Route",
    "load_conf_dir",
    "loopback_network",
    "parse_conf",
    "parse_conflist",
    "parse_result",
    "plugin_config",
    "pod_args",
    "validate_container_id",
    "validate_ifname",
]
