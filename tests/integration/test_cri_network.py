"""Pod networking with real CNI plugins in real network namespaces.

Each test gets its own bridge name, a private /24 no host route uses, and temporary
conf, cache and IPAM dirs; the bridge, netns mounts and directories go away even when
a test fails. Traffic never leaves the test's bridge and namespace.
"""
from __future__ import annotations

import ipaddress
import json
import os
import random
import secrets
import shutil
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from ctrd.daemon.cri import cni, netns
from structlog.testing import capture_logs

from ctrd.errors import FailedPrecondition, InvalidArgument

PLUGIN_DIR = Path("/usr/lib/cni")

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not (PLUGIN_DIR / "bridge").exists(), reason="CNI plugins not installed"),
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for namespaces and links"),
]

# An ICMP echo from inside a namespace: this host has no ping binary.
PING = """
import os, socket, struct, sys
def checksum(b):
    s = sum(struct.unpack('!%dH' % (len(b) // 2), b))
    s = (s >> 16) + (s & 0xffff)
    return ~(s + (s >> 16)) & 0xffff
target = sys.argv[1]
sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
sock.settimeout(3)
head = struct.pack('!BBHHH', 8, 0, 0, os.getpid() & 0xffff, 1) + b'ctrd-cni-test-01'
sock.sendto(head[:2] + struct.pack('!H', checksum(head)) + head[4:], (target, 0))
while True:
    data, peer = sock.recvfrom(2048)
    if peer[0] == target and data[(data[0] & 0xf) * 4] == 0:
        break
"""


def _run(*cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, check=check)


def _mounts_below(path: Path) -> list[str]:
    prefix = str(path)
    return [line.split()[1] for line in Path("/proc/mounts").read_text().splitlines()
            if line.split()[1] == prefix or line.split()[1].startswith(prefix + "/")]


def _link_exists(name: str) -> bool:
    return _run("ip", "link", "show", name, check=False).returncode == 0


def _free_subnet() -> ipaddress.IPv4Network:
    used = _run("ip", "-4", "-o", "addr").stdout + _run("ip", "-4", "route").stdout
    for third in random.sample(range(256), 256):
        if f"10.254.{third}." not in used:
            return ipaddress.ip_network(f"10.254.{third}.0/24")
    pytest.skip("no free 10.254.x.0/24 on this host")


@pytest.fixture
def netns_dir() -> Iterator[Path]:
    """A namespace directory; it becomes a shared self-bind mount, undone at the end."""
    path = Path(tempfile.mkdtemp(prefix="ctrd-netns-", dir="/tmp"))
    try:
        yield path
    finally:
        for target in sorted(_mounts_below(path), reverse=True):
            _run("umount", "-l", target, check=False)
        shutil.rmtree(path, ignore_errors=True)


@dataclass
class Env:
    root: Path
    bridge: str
    subnet: ipaddress.IPv4Network
    conf_dir: Path
    cache_dir: Path
    ipam_dir: Path
    netns_dir: Path
    network: str

    def options(self, **overrides: object) -> cni.CNIOptions:
        values: dict[str, object] = {"conf_dir": self.conf_dir, "cache_dir": self.cache_dir,
                                         "bin_dirs": (PLUGIN_DIR,), "plugin_timeout": 30.0}
        values.update(overrides)
        return cni.CNIOptions(**values)  # type: ignore[arg-type]

    def conflist(self, *extra_plugins: dict[str, object], version: str = "1.0.0") -> dict:
        return {
            "cniVersion": version,
            "name": self.network,
            "plugins": [
                {"type": "bridge", "bridge": self.bridge, "isGateway": True, "ipMasq": False,
                 "ipam": {"type": "host-local", "dataDir": str(self.ipam_dir),
                          "ranges": [[{"subnet": str(self.subnet)}]],
                          "routes": [{"dst": "0.0.0.0/0"}]}},
                *extra_plugins,
            ],
        }

    def write(self, name: str, doc: object) -> Path:
        path = self.conf_dir / name
        path.write_text(doc if isinstance(doc, str) else json.dumps(doc))
        return path

    def reserved_ips(self) -> set[str]:
        """Addresses host-local holds: one file per address in its network's dir."""
        directory = self.ipam_dir / self.network
        if not directory.exists():
            return set()
        return {p.name for p in directory.iterdir()
                if p.name != "lock" and not p.name.startswith("last_reserved_ip")}


@pytest.fixture
def env(netns_dir: Path) -> Iterator[Env]:
    tag = secrets.token_hex(4)
    root = Path(tempfile.mkdtemp(prefix="ctrd-cni-", dir="/tmp"))
    made = Env(root=root, bridge=f"ctrdt{tag}", subnet=_free_subnet(),
               conf_dir=root / "net.d", cache_dir=root / "cache", ipam_dir=root / "ipam",
               netns_dir=netns_dir, network=f"ctrdtest-{tag}")
    made.conf_dir.mkdir()
    try:
        yield made
    finally:
        if _link_exists(made.bridge):
            _run("ip", "link", "del", made.bridge, check=False)
        shutil.rmtree(root, ignore_errors=True)
        assert not _link_exists(made.bridge)


@pytest.fixture
async def pod_ns(env: Env) -> AsyncIterator[netns.NetNS]:
    ns = await netns.create(env.netns_dir)
    try:
        yield ns
    finally:
        await ns.remove()


async def _runtime(env: Env, **overrides: object) -> cni.CNI:
    runtime = cni.CNI(env.options(**overrides))
    await runtime.load()
    return runtime


def _cache_files(env: Env) -> list[str]:
    results = env.cache_dir / "results"
    return sorted(p.name for p in results.iterdir()) if results.exists() else []


# --- network namespaces ------------------------------------------------------------------

async def test_netns_lifecycle(netns_dir: Path) -> None:
    threads_before = {os.stat(f"/proc/self/task/{t}/ns/net").st_ino
                      for t in os.listdir("/proc/self/task")}
    ns = await netns.create(netns_dir)
    try:
        assert ns.path.parent == netns_dir and ns.path.name.startswith("cni-")
        assert ns.is_mounted() and not await ns.closed()
        assert str(ns.path) in _mounts_below(netns_dir)
        # The directory is a shared mount point, as `ip netns` leaves /run/netns.
        info = [line for line in Path("/proc/self/mountinfo").read_text().splitlines()
                if line.split()[4] == str(netns_dir)]
        assert info and "shared:" in info[-1]
        # A fresh namespace: nothing but a loopback that is down.
        links = _run("nsenter", f"--net={ns.path}", "ip", "-o", "link").stdout.splitlines()
        assert len(links) == 1 and ": lo:" in links[0]
        assert os.stat(ns.path).st_ino not in threads_before
        # No thread of this process moved to the new namespace.
        threads_after = {os.stat(f"/proc/self/task/{t}/ns/net").st_ino
                         for t in os.listdir("/proc/self/task")}
        assert threads_after <= threads_before
    finally:
        await ns.remove()
    assert not ns.path.exists()
    assert str(ns.path) not in _mounts_below(netns_dir)
    assert await ns.closed() and not ns.is_mounted()
    await ns.remove()  # idempotent
    await netns.remove(netns_dir / "cni-never-made")


async def test_netns_two_at_once_are_distinct(netns_dir: Path) -> None:
    first = await netns.create(netns_dir)
    second = await netns.create(netns_dir)
    try:
        assert os.stat(first.path).st_ino != os.stat(second.path).st_ino
        # The directory was bound onto itself once only.
        assert _mounts_below(netns_dir).count(str(netns_dir)) == 1
    finally:
        await first.remove()
        await second.remove()
    assert _mounts_below(netns_dir) == [str(netns_dir)]


async def test_netns_stale_file_is_closed_and_cleared(netns_dir: Path) -> None:
    stale = netns_dir / "cni-stale"
    stale.touch()
    ns = netns.NetNS.load(stale)
    assert not ns.is_mounted()
    assert await ns.closed()
    assert not stale.exists()
    stale.touch()
    await netns.remove(stale)  # not mounted: just unlinked
    assert not stale.exists()


async def test_netns_relative_dir_rejected() -> None:
    with pytest.raises(InvalidArgument):
        await netns.create("relative/dir")


# --- attaching pods ----------------------------------------------------------------------

async def test_bridge_setup_and_teardown(env: Env, pod_ns: netns.NetNS) -> None:
    env.write("10-test.conflist", env.conflist(
        {"type": "portmap", "capabilities": {"portMappings": True}}))
    runtime = await _runtime(env)
    assert (await runtime.status()).ready
    sid = "sandbox" + secrets.token_hex(8)
    args = cni.pod_args("default", "web", "uid-1234", sid)

    result = await runtime.setup(sid, str(pod_ns.path), args=args)

    assert result.cni_version == "1.0.0"
    pod_ips = result.ips_of("eth0")
    assert len(pod_ips) == 1
    address = pod_ips[0].address
    assert address.ip in env.subnet and address.network == env.subnet
    assert pod_ips[0].gateway == env.subnet.network_address + 1
    assert result.interfaces[pod_ips[0].interface].sandbox == str(pod_ns.path)
    veths = [i.name for i in result.interfaces if not i.sandbox and i.name != env.bridge]
    assert len(veths) == 1 and _link_exists(veths[0])
    inside = _run("nsenter", f"--net={pod_ns.path}", "ip", "-4", "-o", "addr").stdout
    assert any(line.split()[1] == "eth0" and str(address) in line
               for line in inside.splitlines())
    assert "127.0.0.1/8" in inside  # the loopback plugin ran for lo
    _run("nsenter", f"--net={pod_ns.path}", sys.executable, "-c", PING,
         str(pod_ips[0].gateway))
    assert env.reserved_ips() == {str(address.ip)}
    assert _cache_files(env) == sorted([f"{env.network}-{sid}-eth0", f"cni-loopback-{sid}-lo"])
    cached = json.loads((env.cache_dir / "results" / f"{env.network}-{sid}-eth0").read_text())
    assert cached["kind"] == "cniCacheV1" and cached["containerId"] == sid
    assert ["K8S_POD_NAME", "web"] in cached["cniArgs"]
    assert cached["result"]["ips"][0]["address"] == str(address)

    await runtime.teardown(sid, str(pod_ns.path))

    assert env.reserved_ips() == set()
    assert not _link_exists(veths[0])
    assert _cache_files(env) == []
    inside = _run("nsenter", f"--net={pod_ns.path}", "ip", "-4", "-o", "addr").stdout
    assert str(address) not in inside
    # A second teardown finds nothing to do and says so by not failing.
    await runtime.teardown(sid, str(pod_ns.path))
    assert env.reserved_ips() == set()

    await pod_ns.remove()
    assert not pod_ns.is_mounted() and str(pod_ns.path) not in _mounts_below(env.netns_dir)


async def test_teardown_after_netns_gone_and_restart(env: Env, pod_ns: netns.NetNS) -> None:
    """A new runtime (daemon restart) whose config vanished still releases the address."""
    env.write("10-test.conflist", env.conflist(version="0.4.0"))
    sid = "restart" + secrets.token_hex(4)
    result = await (await _runtime(env)).setup(sid, str(pod_ns.path))
    ip = str(result.ips_of("eth0")[0].address.ip)
    assert env.reserved_ips() == {ip}
    await pod_ns.remove()
    (env.conf_dir / "10-test.conflist").unlink()

    restarted = await _runtime(env)
    assert not (await restarted.status()).ready
    await restarted.teardown(sid, str(pod_ns.path))

    assert env.reserved_ips() == set()
    assert _cache_files(env) == []


async def test_port_mappings_reach_portmap(env: Env, pod_ns: netns.NetNS) -> None:
    if shutil.which("iptables") is None:
        pytest.skip("iptables not installed")
    nat_before = _run("iptables", "-t", "nat", "-S").stdout
    env.write("10-test.conflist", env.conflist(
        {"type": "portmap", "capabilities": {"portMappings": True}, "snat": False}))
    runtime = await _runtime(env)
    sid = "ports" + secrets.token_hex(4)
    host_port = random.randint(20000, 29999)
    try:
        result = await runtime.setup(sid, str(pod_ns.path), port_mappings=[
            cni.PortMapping(host_port, 80, "TCP", "127.0.0.1")])
        ip = result.ips_of("eth0")[0].address.ip
        nat = _run("iptables", "-t", "nat", "-S").stdout
        assert f"--dport {host_port} -j DNAT --to-destination {ip}:80" in nat
        await runtime.teardown(sid, str(pod_ns.path))
        assert f"--dport {host_port}" not in _run("iptables", "-t", "nat", "-S").stdout
    finally:
        _restore_nat(nat_before)


def _restore_nat(before: str) -> None:
    """Drop the shared chains portmap leaves behind, if this test made them."""
    if "CNI-HOSTPORT-DNAT" in before:
        return
    for chain, rule in (("PREROUTING", "-m addrtype --dst-type LOCAL -j CNI-HOSTPORT-DNAT"),
                        ("OUTPUT", "-m addrtype --dst-type LOCAL -j CNI-HOSTPORT-DNAT"),
                        ("POSTROUTING", ("-m comment --comment \"CNI portfwd requiring "
                                        "masquerade\" -j CNI-HOSTPORT-MASQ"))):
        cmd = f"iptables -t nat -D {chain} {rule}"
        subprocess.run(cmd, shell=True, capture_output=True, check=False)
    for chain in ("CNI-HOSTPORT-DNAT", "CNI-HOSTPORT-MASQ", "CNI-HOSTPORT-SETMARK"):
        _run("iptables", "-t", "nat", "-F", chain, check=False)
        _run("iptables", "-t", "nat", "-X", chain, check=False)


# --- hostile input -----------------------------------------------------------------------

async def test_malformed_conflist_skipped(env: Env, pod_ns: netns.NetNS) -> None:
    bad = env.write("00-broken.conflist", '{"cniVersion": "1.0.0", "name": "x", "plugins": [')
    env.write("10-test.conflist", env.conflist())
    with capture_logs() as logs:
        runtime = await _runtime(env)
    assert runtime.network is not None and runtime.network.name == env.network
    assert any(e["event"] == "cni config skipped" and e["file"] == str(bad) for e in logs)
    sid = "skip" + secrets.token_hex(4)
    result = await runtime.setup(sid, str(pod_ns.path))
    assert result.ips_of("eth0")[0].address.ip in env.subnet
    await runtime.teardown(sid, str(pod_ns.path))
    assert env.reserved_ips() == set()


async def test_no_config_not_ready(env: Env, pod_ns: netns.NetNS) -> None:
    runtime = await _runtime(env)
    status = await runtime.status()
    assert not status.ready and status.reason == "NetworkPluginNotReady"
    assert str(env.conf_dir) in status.message
    with pytest.raises(FailedPrecondition, match="not initialized"):
        await runtime.setup("noconf", str(pod_ns.path))
    # A config dropped in later is picked up by the next load.
    env.write("10-test.conflist", env.conflist())
    await runtime.load()
    assert (await runtime.status()).ready


async def test_missing_plugin_binary_named(env: Env, pod_ns: netns.NetNS) -> None:
    env.write("10-test.conflist", {"cniVersion": "1.0.0", "name": env.network,
                                   "plugins": [{"type": "ctrd-no-such-plugin"}]})
    runtime = await _runtime(env)
    with pytest.raises(FailedPrecondition, match="'ctrd-no-such-plugin' not found in /usr/lib/cni"):
        await runtime.setup("missing", str(pod_ns.path))
    # The loopback attachment made before the failure was undone.
    assert _cache_files(env) == []


async def test_plugin_error_carries_its_message(env: Env, pod_ns: netns.NetNS) -> None:
    env.write("10-test.conf", {"cniVersion": "1.0.0", "name": env.network, "type": "vlan",
                               "vlanId": 5})
    runtime = await _runtime(env)
    with pytest.raises(cni.PluginError) as caught:
        await runtime.setup("vlanerr", str(pod_ns.path))
    err = caught.value
    assert err.plugin == "vlan" and err.command == "ADD" and err.code == 999
    assert '"master" field is required' in err.msg
    assert "'vlan'" in str(err) and err.msg in str(err)
    assert _cache_files(env) == []


async def test_invalid_ids_rejected(env: Env, pod_ns: netns.NetNS) -> None:
    env.write("10-test.conflist", env.conflist())
    runtime = await _runtime(env)
    for cid, ifname in (("bad/id", "eth0"), ("", "eth0"), ("ok", "much-too-long-ifname"),
                        ("ok", "eth 0"), ("ok", "lo")):
        with pytest.raises(InvalidArgument):
            await runtime.setup(cid, str(pod_ns.path), ifname=ifname)
    with pytest.raises(InvalidArgument):
        await runtime.teardown("../../etc", str(pod_ns.path))
    with pytest.raises(InvalidArgument):
        await runtime.teardown("ok", str(pod_ns.path), ifname="lo")
    assert not _link_exists(env.bridge)  # nothing ran
    assert _cache_files(env) == []
