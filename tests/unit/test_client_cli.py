"""ctrctl argument handling that needs no daemon: every mistake is one clean line."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

CTRCTL = str(Path(sys.executable).parent / "ctrctl")


def ctrctl(*args: str, tmp: Path) -> subprocess.CompletedProcess:
    return subprocess.run([CTRCTL, "--address", str(tmp / "none.sock"), *args],
                          capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)


def assert_clean(r: subprocess.CompletedProcess, code: int | None = None) -> None:
    assert r.returncode != 0, r
    if code is not None:
        assert r.returncode == code, r
    assert "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip(), "an error must say something"


@pytest.mark.parametrize("args", [
    ["images", "--format", "yaml"],
    ["ps", "--format", "{{.ID}}"],
    ["inspect", "--format", "table", "x"],
    ["nosuchcommand"],
    ["kill", "-s", "SIGNOPE", "x"],
    ["kill", "-s", "999", "x"],
    ["run", "-d", "--rm", "busybox"],
    ["run", "-d", "-t", "busybox"],
    ["run", "--net", "bridge", "busybox"],
    ["stop", "-t", "-1", "x"],
    ["logs", "--tail", "-3", "x"],
    ["rm"],
    ["exec", "c"],
    ["--namespace", "", "ps"],
    ["--timeout", "0", "ps"],
    ["exec", "-u", "someone", "c", "true"],
])
def test_usage_errors_exit_2(args: list[str], tmp_path: Path) -> None:
    assert_clean(ctrctl(*args, tmp=tmp_path), 2)


@pytest.mark.parametrize("args", [
    ["version"], ["ps", "-a"], ["images"], ["namespace", "ls"], ["info"],
    ["run", "busybox", "true"], ["rm", "x"], ["image", "rm", "x"],
])
def test_unreachable_daemon(args: list[str], tmp_path: Path) -> None:
    r = ctrctl(*args, tmp=tmp_path)
    assert_clean(r, 1)
    assert "cannot reach daemon" in r.stderr


@pytest.mark.parametrize("args,message", [
    (["run", "--memory", "lots", "busybox"], "invalid size"),
    (["run", "-e", "=x", "busybox"], "invalid environment variable"),
    (["import", "/nonexistent/archive.tar"], "no such file"),
    (["load", "-i", "/nonexistent/archive.tar"], "no such file"),
    (["image", "build-default", "--name", "Not A Name"], "invalid reference"),
    (["image", "tag", "a", "repo/UPPER"], "lowercase"),
    (["pull", "bad::ref"], "invalid reference"),
    (["pull", "--platform", "linux", "busybox"], "invalid platform"),
])
def test_bad_input_exits_1(args: list[str], message: str, tmp_path: Path) -> None:
    r = ctrctl(*args, tmp=tmp_path)
    assert_clean(r, 1)
    assert message in r.stderr


def test_env_vars_pick_daemon_and_namespace(tmp_path: Path) -> None:
    env = {"PATH": "/usr/bin:/bin", "CTRD_ADDRESS": str(tmp_path / "env.sock"),
           "CTRD_NAMESPACE": "from-env"}
    r = subprocess.run([CTRCTL, "ps"], capture_output=True, text=True, env=env, timeout=60)
    assert_clean(r, 1)
    assert str(tmp_path / "env.sock") in r.stderr


def test_help_and_version() -> None:
    r = subprocess.run([CTRCTL, "--help"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "run" in r.stdout and "namespace" in r.stdout
    r = subprocess.run([CTRCTL, "--version"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "ctrctl" in r.stdout
