"""The pure parts of the CNI runtime: config loading, results, what plugins are given."""
from __future__ import annotations

import ipaddress
import json
from pathlib import Path

import pytest
from ctrd.daemon.cri import cni
from structlog.testing import capture_logs

from ctrd.errors import FailedPrecondition, InvalidArgument

BRIDGE_LIST = {
    "cniVersion": "1.0.0",
    "name": "pods",
    "plugins": [
        {"type": "bridge", "bridge": "cni0", "ipam": {"type": "host-local"}},
        {"type": "portmap", "capabilities": {"portMappings": True, "bandwidth": False}},
    ],
}


def _bytes(doc: object) -> bytes:
    return json.dumps(doc).encode()


# --- config ------------------------------------------------------------------------------

def test_conflist_parsed() -> None:
    net = cni.parse_conflist(_bytes(BRIDGE_LIST))
    assert net.name == "pods"
    assert net.cni_version == "1.0.0"
    assert [p.type for p in net.plugins] == ["bridge", "portmap"]
    assert net.plugins[0].capabilities == frozenset()
    assert net.plugins[1].capabilities == {"portMappings"}
    assert net.plugins[0].raw["bridge"] == "cni0"


@pytest.mark.parametrize("doc, fragment", [
    ("{not json", "invalid JSON"),
    ("[1, 2]", "not a JSON object"),
    ({"cniVersion": "1.0.0", "plugins": [{"type": "bridge"}]}, "network name"),
    ({"cniVersion": "1.0.0", "name": "bad/name", "plugins": [{"type": "x"}]}, "network name"),
    ({"cniVersion": "0.2.0", "name": "n", "plugins": [{"type": "x"}]}, "cniVersion"),
    ({"name": "n", "plugins": [{"type": "x"}]}, "cniVersion"),
    ({"cniVersion": "1.0.0", "name": "n", "plugins": []}, "non-empty"),
    ({"cniVersion": "1.0.0", "name": "n", "plugins": {"type": "x"}}, "non-empty"),
    ({"cniVersion": "1.0.0", "name": "n", "plugins": [{"ipam": {}}]}, "no 'type'"),
    ({"cniVersion": "1.0.0", "name": "n", "plugins": ["bridge"]}, "not a JSON object"),
    ({"cniVersion": "1.0.0", "name": "n", "plugins": [{"type": "../bin/sh"}]}, "invalid type"),
    ({"cniVersion": "1.0.0", "name": "n",
      "plugins": [{"type": "x", "capabilities": ["portMappings"]}]}, "capabilities"),
])
def test_conflist_rejected(doc: object, fragment: str) -> None:
    data = doc.encode() if isinstance(doc, str) else _bytes(doc)
    with pytest.raises(cni.ConfigError, match=fragment):
        cni.parse_conflist(data)


def test_single_plugin_conf_wrapped_into_list() -> None:
    doc = {"cniVersion": "0.4.0", "name": "single", "type": "bridge", "bridge": "br9"}
    net = cni.parse_conf(_bytes(doc))
    assert (net.name, net.cni_version) == ("single", "0.4.0")
    assert [p.type for p in net.plugins] == ["bridge"]
    # The wrapped bytes are a list again, so the cache can hold either kind of file.
    again = cni.parse_conflist(net.source)
    assert again.plugins[0].raw == doc


def test_conf_with_a_plugin_list_rejected() -> None:
    with pytest.raises(cni.ConfigError, match="conflist"):
        cni.parse_conf(_bytes(BRIDGE_LIST))


def test_conf_dir_lexical_first_valid_wins(tmp_path: Path) -> None:
    good = dict(BRIDGE_LIST, name="second")
    (tmp_path / "00-broken.conflist").write_text('{"cniVersion": "1.0.0", "name": ')
    (tmp_path / "05-notes.txt").write_text("not a config")
    (tmp_path / "07-dir.conf").mkdir()
    (tmp_path / "10-good.conflist").write_bytes(_bytes(good))
    (tmp_path / "20-later.conf").write_bytes(_bytes(
        {"cniVersion": "1.0.0", "name": "third", "type": "bridge"}))
    with capture_logs() as logs:
        net = cni.load_conf_dir(tmp_path)
    assert net is not None and net.name == "second"
    assert net.path == tmp_path / "10-good.conflist"
    skipped = [e for e in logs if e["event"] == "cni config skipped"]
    assert [e["file"] for e in skipped] == [str(tmp_path / "00-broken.conflist")]
    assert "invalid JSON" in skipped[0]["error"]


def test_conf_dir_single_plugin_files(tmp_path: Path) -> None:
    (tmp_path / "50-a.json").write_bytes(_bytes(
        {"cniVersion": "1.0.0", "name": "fromjson", "type": "ptp"}))
    net = cni.load_conf_dir(tmp_path)
    assert net is not None and net.name == "fromjson"
    assert [p.type for p in net.plugins] == ["ptp"]


def test_conf_dir_missing_or_empty(tmp_path: Path) -> None:
    assert cni.load_conf_dir(tmp_path / "absent") is None
    assert cni.load_conf_dir(tmp_path) is None
    (tmp_path / "1.conflist").write_text("garbage")
    assert cni.load_conf_dir(tmp_path) is None


def test_builtin_loopback() -> None:
    lo = cni.loopback_network()
    assert lo.name == "cni-loopback"
    assert [p.type for p in lo.plugins] == ["loopback"]


# --- results -----------------------------------------------------------------------------

RESULT_100 = {
    "cniVersion": "1.0.0",
    "interfaces": [
        {"name": "cni0", "mac": "aa:aa:aa:aa:aa:01"},
        {"name": "veth1", "mac": "aa:aa:aa:aa:aa:02"},
        {"name": "eth0", "mac": "aa:aa:aa:aa:aa:03", "sandbox": "/var/run/netns/cni-1"},
    ],
    "ips": [
        {"interface": 2, "address": "10.88.0.5/16", "gateway": "10.88.0.1"},
        {"interface": 2, "address": "fd00::5/64"},
    ],
    "routes": [{"dst": "0.0.0.0/0"}, {"dst": "192.168.0.0/16", "gw": "10.88.0.254"}],
    "dns": {"nameservers": ["10.96.0.10"], "search": ["svc.local"]},
}


def test_result_parsed() -> None:
    r = cni.parse_result(RESULT_100)
    assert r.cni_version == "1.0.0"
    assert [i.name for i in r.interfaces] == ["cni0", "veth1", "eth0"]
    assert r.interfaces[2].sandbox == "/var/run/netns/cni-1"
    first = r.ips[0]
    assert first.address == ipaddress.ip_interface("10.88.0.5/16")
    assert first.address.network == ipaddress.ip_network("10.88.0.0/16")
    assert first.gateway == ipaddress.ip_address("10.88.0.1")
    assert first.interface == 2
    assert r.ips[1].gateway is None
    assert r.routes[0] == cni.Route(ipaddress.ip_network("0.0.0.0/0"))
    assert r.routes[1].gw == ipaddress.ip_address("10.88.0.254")
    assert r.dns.nameservers == ("10.96.0.10",)
    assert r.dns.search == ("svc.local",)
    assert [str(ip.address) for ip in r.ips_of("eth0")] == ["10.88.0.5/16", "fd00::5/64"]
    assert r.ips_of("veth1") == []


def test_result_round_trips_and_converts() -> None:
    r = cni.parse_result(RESULT_100)
    assert r.to_json() == RESULT_100
    old = r.to_json("0.4.0")
    assert old["cniVersion"] == "0.4.0"
    assert [ip["version"] for ip in old["ips"]] == ["4", "6"]
    back = cni.parse_result(old)
    assert back.cni_version == "0.4.0"
    assert back.to_json("1.0.0") == RESULT_100


def test_result_version_from_config_when_absent() -> None:
    r = cni.parse_result({"ips": [{"version": "4", "address": "10.0.0.2/24"}]}, "0.3.1")
    assert r.cni_version == "0.3.1"
    assert r.ips_of("eth0")[0].interface is None


@pytest.mark.parametrize("doc, fragment", [
    ([], "not a JSON object"),
    ({"cniVersion": "9.9.9"}, "unsupported"),
    ({"cniVersion": "1.0.0", "ips": [{"interface": 3, "address": "10.0.0.1/8"}]}, "interface 3"),
    ({"cniVersion": "1.0.0", "interfaces": [{"name": "eth0"}],
      "ips": [{"interface": True, "address": "10.0.0.1/8"}]}, "interface True"),
    ({"cniVersion": "1.0.0", "ips": [{"address": "10.0.0.300/8"}]}, "invalid address"),
    ({"cniVersion": "1.0.0", "ips": [{"address": "10.0.0.3/8", "gateway": "x"}]}, "gateway"),
    ({"cniVersion": "1.0.0", "ips": [{"gateway": "10.0.0.1"}]}, "malformed"),
    ({"cniVersion": "1.0.0", "interfaces": [{"mac": "aa"}]}, "malformed"),
    ({"cniVersion": "1.0.0", "routes": [{"dst": "nowhere"}]}, "route destination"),
    ({"cniVersion": "1.0.0", "dns": {"nameservers": "1.1.1.1"}}, "nameservers"),
    ({"cniVersion": "1.0.0", "dns": ["1.1.1.1"]}, "dns is not an object"),
])
def test_result_rejected(doc: object, fragment: str) -> None:
    with pytest.raises(cni.ResultError, match=fragment):
        cni.parse_result(doc)


# --- what a plugin receives ------------------------------------------------------------

def test_plugin_config_injects_name_version_prev_and_declared_capabilities() -> None:
    net = cni.parse_conflist(_bytes(BRIDGE_LIST))
    bridge, portmap = net.plugins
    caps = {"portMappings": [cni.PortMapping(8080, 80).to_cni()], "bandwidth": {"x": 1}}
    conf = cni.plugin_config(net, bridge, None, caps)
    assert conf["name"] == "pods" and conf["cniVersion"] == "1.0.0"
    assert "runtimeConfig" not in conf and "prevResult" not in conf
    prev = cni.parse_result(RESULT_100)
    conf = cni.plugin_config(net, portmap, prev, caps)
    # bandwidth is declared false, so only the port mappings get through.
    assert conf["runtimeConfig"] == {"portMappings": [
        {"hostPort": 8080, "containerPort": 80, "protocol": "tcp"}]}
    assert conf["prevResult"] == RESULT_100
    assert conf["capabilities"] == {"portMappings": True, "bandwidth": False}


def test_plugin_config_prev_result_in_list_version() -> None:
    net = cni.parse_conflist(_bytes(dict(BRIDGE_LIST, cniVersion="0.4.0")))
    conf = cni.plugin_config(net, net.plugins[1], cni.parse_result(RESULT_100), {})
    assert conf["prevResult"]["cniVersion"] == "0.4.0"
    assert conf["prevResult"]["ips"][0]["version"] == "4"


def test_port_mapping_json() -> None:
    assert cni.PortMapping(443, 8443, "UDP", "127.0.0.1").to_cni() == {
        "hostPort": 443, "containerPort": 8443, "protocol": "udp", "hostIP": "127.0.0.1"}


def test_pod_args() -> None:
    args = cni.pod_args("ns1", "web", "uid-1", "abc")
    assert args == {"IgnoreUnknown": "1", "K8S_POD_NAMESPACE": "ns1", "K8S_POD_NAME": "web",
                    "K8S_POD_INFRA_CONTAINER_ID": "abc", "K8S_POD_UID": "uid-1"}


@pytest.mark.parametrize("ifname", ["", "a" * 16, ".", "..", "eth/0", "eth:0", "eth 0"])
def test_invalid_ifnames(ifname: str) -> None:
    with pytest.raises(InvalidArgument):
        cni.validate_ifname(ifname)


@pytest.mark.parametrize("cid", ["", "-lead", "a/b", "a b", "a;b", "../x"])
def test_invalid_container_ids(cid: str) -> None:
    with pytest.raises(InvalidArgument):
        cni.validate_container_id(cid)


def test_valid_names() -> None:
    cni.validate_ifname("eth0")
    cni.validate_ifname("a" * 15)
    cni.validate_container_id("0123abc_def.g-h")


def test_plugin_error_text() -> None:
    err = cni.PluginError("bridge", "ADD", "no IP", 7, "range full")
    assert str(err) == "CNI plugin 'bridge' failed (ADD): no IP: range full (CNI error code 7)"
    assert (err.plugin, err.msg, err.code) == ("bridge", "no IP", 7)


async def test_not_ready_without_config(tmp_path: Path) -> None:
    runtime = cni.CNI(cni.CNIOptions(conf_dir=tmp_path, cache_dir=tmp_path / "cache"))
    assert await runtime.load() is None
    status = await runtime.status()
    assert not status.ready and status.reason == "NetworkPluginNotReady"
    with pytest.raises(FailedPrecondition, match="not initialized"):
        await runtime.setup("abc", "/var/run/netns/none")


async def test_bad_cni_args_rejected(tmp_path: Path) -> None:
    (tmp_path / "1.conflist").write_bytes(_bytes(BRIDGE_LIST))
    runtime = cni.CNI(cni.CNIOptions(conf_dir=tmp_path, cache_dir=tmp_path / "cache"))
    await runtime.load()
    for args in ({"A;B": "1"}, {"A": "x;y"}, {"": "v"}, {"A=B": "c"}):
        with pytest.raises(InvalidArgument, match="CNI argument"):
            await runtime.setup("abc", "/var/run/netns/x", args=args)
    with pytest.raises(InvalidArgument, match="absolute"):
        await runtime.setup("abc", "relative/ns")
    with pytest.raises(InvalidArgument, match="loopback"):
        await runtime.setup("abc", "/var/run/netns/x", ifname="lo")
