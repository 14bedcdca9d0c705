"""ctrd.client.spec: the client-side default OCI spec and its options."""
from __future__ import annotations

import pytest

from ctrd import errors
from ctrd.client import spec
from ctrd.oci import spec as oci

IMAGE = {"config": {"Entrypoint": ["/entry"], "Cmd": ["serve"], "Env": ["PATH=/bin", "A=1"],
                    "WorkingDir": "/srv", "User": ""}}


def test_default_spec_shape() -> None:
    s = oci.default_spec("ns", "c1")
    assert s["root"] == {"path": "rootfs"}
    assert s["linux"]["cgroupsPath"] == "/ns/c1"
    assert {n["type"] for n in s["linux"]["namespaces"]} == {"pid", "ipc", "uts", "mount",
                                                              "network"}
    destinations = [m["destination"] for m in s["mounts"]]
    assert destinations[:2] == ["/proc", "/dev"] and "/dev/pts" in destinations
    assert s["process"]["noNewPrivileges"] is True
    assert s["linux"]["resources"]["devices"][0] == {"allow": False, "access": "rwm"}


def test_build_uses_image_config() -> None:
    s = spec.build("abcdef0123456789", "default", IMAGE, spec.SpecOptions())
    p = s["process"]
    assert p["args"] == ["/entry", "serve"]
    assert p["cwd"] == "/srv"
    assert "PATH=/bin" in p["env"] and "A=1" in p["env"]
    assert s["hostname"] == "abcdef012345"


def test_build_options_override() -> None:
    opts = spec.SpecOptions(args=["sh"], env=["A=2", "B"], cwd="/tmp", terminal=True,
                            memory=spec.parse_size("64m"), read_only=True,
                            user=spec.User(1000, 1000), entrypoint=[])
    s = spec.build("c", "default", IMAGE, opts)
    p = s["process"]
    assert p["args"] == ["sh"]
    assert p["env"].count("A=2") == 1 and "A=1" not in p["env"] and "B=" in p["env"]
    assert "TERM=xterm" in p["env"] and p["terminal"] is True
    assert p["user"] == {"uid": 1000, "gid": 1000}
    assert s["linux"]["resources"]["memory"] == {"limit": 64 << 20}
    assert s["root"]["readonly"] is True


def test_host_network_drops_netns_and_binds_resolv() -> None:
    s = spec.build("c", "default", IMAGE, spec.SpecOptions(host_network=True))
    assert "network" not in {n["type"] for n in s["linux"]["namespaces"]}
    assert {"/etc/hosts", "/etc/resolv.conf"} <= {m["destination"] for m in s["mounts"]}


def test_no_command_is_an_error() -> None:
    with pytest.raises(errors.InvalidArgument):
        spec.build("c", "default", {"config": {}}, spec.SpecOptions())


def test_relative_workdir_is_an_error() -> None:
    with pytest.raises(errors.InvalidArgument):
        spec.build("c", "default", IMAGE, spec.SpecOptions(cwd="tmp"))


@pytest.mark.parametrize("text,value", [("512", 512), ("64k", 65536), ("100m", 100 << 20),
                                        ("1g", 1 << 30), ("1.5G", 3 << 29), ("2mb", 2 << 20)])
def test_parse_size(text: str, value: int) -> None:
    assert spec.parse_size(text) == value


@pytest.mark.parametrize("text", ["", "abc", "-1m", "0", "12q", "1e9"])
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(errors.InvalidArgument):
        spec.parse_size(text)


@pytest.mark.parametrize("bad", ["=x", " A=1", "A B=1"])
def test_parse_env_rejects(bad: str) -> None:
    with pytest.raises(errors.InvalidArgument):
        spec.parse_env([bad])


PASSWD = "root:x:0:0:root:/root:/bin/sh\nwww:x:33:34::/var/www:/bin/false\n"
GROUP = "root:x:0:\nstaff:x:50:\n"


@pytest.mark.parametrize("user,uid,gid", [
    ("", 0, 0), ("0", 0, 0), ("www", 33, 34), ("33", 33, 34), ("www:staff", 33, 50),
    ("www:7", 33, 7), ("1234", 1234, 0), ("1234:5", 1234, 5),
])
def test_resolve_user(user: str, uid: int, gid: int) -> None:
    assert spec.resolve_user(user, PASSWD, GROUP) == spec.User(uid, gid)


@pytest.mark.parametrize("user,exc", [("nobody", errors.NotFound), ("www:nogroup", errors.NotFound),
                                      ("www:", errors.InvalidArgument),
                                      (":5", errors.InvalidArgument)])
def test_resolve_user_errors(user: str, exc: type) -> None:
    with pytest.raises(exc):
        spec.resolve_user(user, PASSWD, GROUP)


def test_needs_lookup() -> None:
    assert spec.needs_lookup("www") and spec.needs_lookup("33") and spec.needs_lookup("1:staff")
    assert not spec.needs_lookup("1:2")


def test_process_for_exec() -> None:
    base = spec.build("c", "default", IMAGE, spec.SpecOptions())
    p = spec.process_for_exec(base, ["ls", "-l"], terminal=True, env=["X=1"], cwd="/etc")
    assert p["args"] == ["ls", "-l"] and p["terminal"] is True and p["cwd"] == "/etc"
    assert "X=1" in p["env"] and "TERM=xterm" in p["env"]
    assert base["process"]["args"] == ["/entry", "serve"]  # the container's spec is untouched
    with pytest.raises(errors.InvalidArgument):
        spec.process_for_exec(base, [], terminal=False)
