"""The shared default OCI spec generator (ctrd/oci/spec.py)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from ctrd.errors import InvalidArgument, NotFound
from ctrd.oci import spec as oci
from ctrd.oci.seccomp import default_profile


def test_defaults_match_containerd() -> None:
    s = oci.default_spec("ns1", "c1", args=["sh"], seccomp=False)
    assert s["root"] == {"path": "rootfs"}
    p = s["process"]
    assert p["args"] == ["sh"] and p["cwd"] == "/" and p["noNewPrivileges"] is True
    assert p["user"] == {"uid": 0, "gid": 0}
    assert p["env"] == [oci.DEFAULT_PATH]
    assert p["capabilities"]["bounding"] == list(oci.DEFAULT_CAPABILITIES)
    assert p["rlimits"] == [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}]
    linux = s["linux"]
    assert linux["cgroupsPath"] == "/ns1/c1"
    assert [n["type"] for n in linux["namespaces"]] == ["pid", "ipc", "uts", "mount", "network"]
    assert "/proc/kcore" in linux["maskedPaths"] and "/proc/sys" in linux["readonlyPaths"]
    assert linux["resources"]["devices"] == [{"allow": False, "access": "rwm"}]
    assert [m["destination"] for m in s["mounts"]] == [
        "/proc", "/dev", "/dev/pts", "/dev/shm", "/dev/mqueue", "/sys", "/run"]
    assert "seccomp" not in linux
    json.loads(oci.dumps(s))


def test_seccomp_follows_capabilities() -> None:
    denied = default_profile(oci.DEFAULT_CAPABILITIES, "x86_64")["syscalls"][0]["names"]
    assert {"mount", "ptrace", "kexec_load", "reboot", "unshare"} <= set(denied)
    assert "clone3" not in denied  # glibc only falls back to clone on ENOSYS
    privileged = default_profile([*oci.DEFAULT_CAPABILITIES, "CAP_SYS_ADMIN", "CAP_SYS_PTRACE"],
                                 "x86_64")["syscalls"][0]["names"]
    assert "mount" not in privileged and "ptrace" not in privileged
    assert "kexec_load" in privileged
    s = oci.default_spec("default", "x")
    assert s["linux"]["seccomp"]["defaultAction"] == "SCMP_ACT_ALLOW"


def test_merge_env() -> None:
    assert oci.merge_env(["A=1", "B=2"], ["B=3", "C=4", "A"]) == ["B=3", "C=4"]


@pytest.fixture
def rootfs(tmp_path: Path) -> Path:
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc/passwd").write_text("root:x:0:0::/root:/bin/sh\napp:x:1000:1001::/:/bin/sh\n")
    (tmp_path / "etc/group").write_text("root:x:0:\napp:x:1001:\nextra:x:2000:app,other\n")
    return tmp_path


def test_image_config(rootfs: Path) -> None:
    s = oci.default_spec("default", "c", seccomp=False)
    s["process"]["env"] = ["FOO=override", "NEW=1"]
    config = {"Entrypoint": ["/entry"], "Cmd": ["a", "b"], "Env": ["PATH=/bin", "FOO=image"],
              "WorkingDir": "/work", "User": "app"}
    oci.with_image_config(s, config, rootfs=rootfs)
    p = s["process"]
    assert p["args"] == ["/entry", "a", "b"]
    assert p["env"] == ["PATH=/bin", "FOO=override", "NEW=1"]
    assert p["cwd"] == "/work"
    assert p["user"] == {"uid": 1000, "gid": 1001, "additionalGids": [1001, 2000]}
    oci.with_image_config(s, config, args=["x"], rootfs=rootfs)
    assert s["process"]["args"] == ["/entry", "x"]


def test_user_forms(rootfs: Path) -> None:
    s: dict = {}
    assert oci.with_user(s, "1000", rootfs)["process"]["user"] == {"uid": 1000, "gid": 1001}
    assert oci.with_user(s, "5:6")["process"]["user"] == {"uid": 5, "gid": 6}
    assert oci.with_user(s, "app:extra", rootfs)["process"]["user"] == {"uid": 1000, "gid": 2000}
    with pytest.raises(NotFound):
        oci.with_user(s, "nobody", rootfs)
    with pytest.raises(InvalidArgument):
        oci.with_user(s, str(2**31))


def test_options() -> None:
    s = oci.default_spec("default", "c", seccomp=False)
    oci.with_memory_limit(s, 1 << 20)
    oci.with_readonly_rootfs(s)
    oci.with_host_network(s)
    oci.with_tty(s)
    assert s["linux"]["resources"]["memory"]["limit"] == 1 << 20
    assert s["root"]["readonly"] is True
    assert "network" not in [n["type"] for n in s["linux"]["namespaces"]]
    assert s["process"]["terminal"] is True and "TERM=xterm" in s["process"]["env"]
