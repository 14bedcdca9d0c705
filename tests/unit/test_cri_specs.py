"""CRI records and the specs built from them: pure functions, no daemon."""
from __future__ import annotations

from pathlib import Path

import pytest
from ctrd.daemon.cri import records, specs
from ctrd.daemon.cri.records import (
    Container,
    ContainerConfig,
    Mount,
    NamespaceMode,
    PortMapping,
    Resources,
    Sandbox,
    SandboxConfig,
    SandboxState,
)

from ctrd.errors import InvalidArgument, NotFound

FILES = Path("/run/pod-files")
IMAGE = {"Entrypoint": ["/entry"], "Cmd": ["default-arg"], "Env": ["PATH=/bin", "A=image"],
         "WorkingDir": "/srv"}


def _pod(**kw) -> Sandbox:
    config = SandboxConfig(name="web", uid="u1", namespace="default", hostname="web", **kw)
    return Sandbox(id="p" * 64, name="k8s_POD_web", config=config, pid=4242,
                   netns_path="/var/run/netns/cni-1", state=SandboxState.READY)


def _spec(config: ContainerConfig, pod: Sandbox | None = None) -> dict:
    return specs.container_spec("c" * 64, config, pod or _pod(), IMAGE, "busybox", None,
                                FILES, "k8s.io")


def test_records_round_trip_and_reject_corrupt_data() -> None:
    pod = _pod(port_mappings=[PortMapping("udp", 53, 5353)], network=NamespaceMode.NODE)
    assert records.loads(Sandbox, records.dumps(pod)) == pod
    container = Container(id="c", name="n", sandbox_id="p", image_id="sha256:x",
                          image_ref="busybox",
                          config=ContainerConfig(name="a", envs=[("K", "V")],
                                                 mounts=[Mount("/d", "/h", True, 1)],
                                                 resources=Resources(memory_limit=1 << 20)))
    again = records.loads(Container, records.dumps(container))
    assert again == container and again.config.envs == [("K", "V")]
    for bad in (b"", b"{", b"[]", b'{"id": 1}', b'{"config": {"nope": 1}}'):
        with pytest.raises(InvalidArgument):
            records.loads(Container, bad)


def test_command_and_args_follow_cri_rules() -> None:
    # Neither: the image's entrypoint and cmd.
    assert _spec(ContainerConfig(name="a"))["process"]["args"] == ["/entry", "default-arg"]
    # Args only: they replace Cmd, the entrypoint stays.
    assert _spec(ContainerConfig(name="a", args=["x"]))["process"]["args"] == ["/entry", "x"]
    # Command: replaces the entrypoint and drops the image's Cmd.
    assert _spec(ContainerConfig(name="a", command=["sh"]))["process"]["args"] == ["sh"]
    assert _spec(ContainerConfig(name="a", command=["sh"], args=["-c", "true"]))[
        "process"]["args"] == ["sh", "-c", "true"]


def test_env_cwd_and_pod_namespaces() -> None:
    spec = _spec(ContainerConfig(name="a", envs=[("A", "mine"), ("B", "2")]))
    assert spec["process"]["env"] == ["PATH=/bin", "A=mine", "B=2"]
    assert spec["process"]["cwd"] == "/srv"
    paths = {n["type"]: n.get("path") for n in spec["linux"]["namespaces"]}
    assert paths["network"] == "/proc/4242/ns/net"
    assert paths["ipc"] == "/proc/4242/ns/ipc" and paths["uts"] == "/proc/4242/ns/uts"
    assert paths["pid"] is None  # its own PID namespace unless the pod shares one
    assert spec["hostname"] == "web"
    assert spec["linux"]["cgroupsPath"] == "/k8s.io/" + "c" * 64
    mounts = {m["destination"]: m["source"] for m in spec["mounts"]}
    assert mounts["/etc/resolv.conf"] == str(FILES / "resolv.conf")
    annotations = spec["annotations"]
    assert annotations["io.kubernetes.cri.container-type"] == "container"
    assert annotations["io.kubernetes.cri.sandbox-id"] == "p" * 64
    shared = _spec(ContainerConfig(name="a", pid=NamespaceMode.POD))
    assert {n["type"]: n.get("path") for n in shared["linux"]["namespaces"]}["pid"] == \
        "/proc/4242/ns/pid"


def test_host_network_pod_has_no_network_namespace() -> None:
    pod = _pod(network=NamespaceMode.NODE)
    spec = _spec(ContainerConfig(name="a"), pod)
    assert "network" not in {n["type"] for n in spec["linux"]["namespaces"]}
    sandbox = specs.sandbox_spec(pod, IMAGE, FILES, "k8s.io")
    assert "network" not in {n["type"] for n in sandbox["linux"]["namespaces"]}
    assert sandbox["annotations"]["io.kubernetes.cri.container-type"] == "sandbox"


def test_sandbox_joins_its_netns_by_path() -> None:
    sandbox = specs.sandbox_spec(_pod(cgroup_parent="/kubepods/pod1"), IMAGE, FILES, "k8s.io")
    net = [n for n in sandbox["linux"]["namespaces"] if n["type"] == "network"]
    assert net == [{"type": "network", "path": "/var/run/netns/cni-1"}]
    assert sandbox["linux"]["cgroupsPath"] == "/kubepods/pod1/" + "p" * 64
    assert sandbox["root"]["readonly"] is True


def test_security_resources_and_mounts() -> None:
    spec = _spec(ContainerConfig(
        name="a", add_capabilities=["NET_ADMIN"], drop_capabilities=["CAP_CHOWN"],
        resources=Resources(cpu_quota=50000, cpu_period=100000, memory_limit=64 << 20),
        mounts=[Mount("/data", "/host/data", readonly=True, propagation=1)],
        readonly_rootfs=True, no_new_privs=True))
    caps = spec["process"]["capabilities"]["bounding"]
    assert "CAP_NET_ADMIN" in caps and "CAP_CHOWN" not in caps
    assert spec["linux"]["resources"]["memory"] == {"limit": 64 << 20}
    assert spec["linux"]["resources"]["cpu"] == {"quota": 50000, "period": 100000}
    assert spec["root"]["readonly"] is True and spec["process"]["noNewPrivileges"] is True
    data = next(m for m in spec["mounts"] if m["destination"] == "/data")
    assert data["options"] == ["rbind", "rslave", "ro"]
    dropped = _spec(ContainerConfig(name="a", drop_capabilities=["ALL"]))
    assert dropped["process"]["capabilities"]["bounding"] == []
    privileged = _spec(ContainerConfig(name="a", privileged=True))
    assert "seccomp" not in privileged["linux"] and privileged["linux"]["maskedPaths"] == []
    assert "CAP_SYS_ADMIN" in privileged["process"]["capabilities"]["bounding"]


@pytest.mark.parametrize("config", [
    ContainerConfig(name="a", working_dir="relative"),
    ContainerConfig(name="a", mounts=[Mount("relative", "/h")]),
    ContainerConfig(name="a", mounts=[Mount("/d", "")]),
    ContainerConfig(name="a", mounts=[Mount("/d", "/h", propagation=9)]),
    ContainerConfig(name="a", add_capabilities=["ALL"]),
    ContainerConfig(name="a", add_capabilities=["NET ADMIN; rm"]),
    ContainerConfig(name="a", resources=Resources(memory_limit=-1)),
    ContainerConfig(name="a", resources=Resources(oom_score_adj=5000)),
    ContainerConfig(name="a", run_as_username="nobody-here"),
])
def test_hostile_container_configs(config: ContainerConfig) -> None:
    with pytest.raises(Exception) as info:
        _spec(config)
    assert type(info.value).__name__ in ("InvalidArgument", "NotFound")


def test_exec_process_replaces_args_only() -> None:
    process = _spec(ContainerConfig(name="a", tty=True))["process"]
    exec_ = specs.exec_process(process, ["ls"])
    assert exec_["args"] == ["ls"] and exec_["terminal"] is False
    assert exec_["env"] == process["env"] and process["terminal"] is True
    with pytest.raises(InvalidArgument):
        specs.exec_process(process, [])


def test_oom_score_adj_is_restricted_to_a_floor() -> None:
    assert specs.sandbox_spec(_pod(), IMAGE, FILES, "k8s.io")["process"]["oomScoreAdj"] == -998
    assert specs.sandbox_spec(_pod(), IMAGE, FILES, "k8s.io", oom_floor=0)[
        "process"]["oomScoreAdj"] == 0
    config = ContainerConfig(name="a", resources=Resources(oom_score_adj=-500))
    assert _spec(config)["process"]["oomScoreAdj"] == -500
    restricted = specs.container_spec("c" * 64, config, _pod(), IMAGE, "busybox", None, FILES,
                                      "k8s.io", oom_floor=100)
    assert restricted["process"]["oomScoreAdj"] == 100


def test_seccomp_follows_the_request(tmp_path: Path) -> None:
    # Unset is unconfined, for the pause process too, as under containerd.
    assert "seccomp" not in _spec(ContainerConfig(name="a"))["linux"]
    assert "seccomp" not in specs.sandbox_spec(_pod(), IMAGE, FILES, "k8s.io")["linux"]
    default = _spec(ContainerConfig(name="a", seccomp="runtime/default"))["linux"]["seccomp"]
    assert "keyctl" in default["syscalls"][0]["names"]
    profile = tmp_path / "profile.json"
    profile.write_text('{"defaultAction": "SCMP_ACT_LOG"}')
    local = _spec(ContainerConfig(name="a", seccomp=f"localhost/{profile}"))
    assert local["linux"]["seccomp"] == {"defaultAction": "SCMP_ACT_LOG"}
    privileged = _spec(ContainerConfig(name="a", seccomp="runtime/default", privileged=True))
    assert "seccomp" not in privileged["linux"]


@pytest.mark.parametrize(("profile", "error"), [
    ("localhost/relative.json", InvalidArgument),
    ("localhost/nowhere/at/all.json", InvalidArgument),
    ("localhost/no/such/profile.json", InvalidArgument),
    ("bogus", InvalidArgument),
])
def test_hostile_seccomp_profiles(profile: str, error: type) -> None:
    with pytest.raises(error):
        _spec(ContainerConfig(name="a", seccomp=profile))


def test_seccomp_profile_files_must_be_real_profiles(tmp_path: Path) -> None:
    missing = tmp_path / "missing.json"
    with pytest.raises(NotFound):
        _spec(ContainerConfig(name="a", seccomp=f"localhost/{missing}"))
    for text in ("not json", "[]", '{"syscalls": []}'):
        bad = tmp_path / "bad.json"
        bad.write_text(text)
        with pytest.raises(InvalidArgument):
            _spec(ContainerConfig(name="a", seccomp=f"localhost/{bad}"))
