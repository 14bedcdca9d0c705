"""ctrd starts its shims through the shim zygote, and still starts them by exec'ing
``start`` once the zygote is gone.

A shim the zygote forked carries the title ``containerd-shim-ctrd-v2 -namespace ...``
as its command line and is announced in the zygote's log (relayed into the daemon's);
one started by exec runs under the interpreter (``python -IS .../containerd-shim-ctrd-v2``).
"""
from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from helpers.runtime_env import Runtime, rootfs_dir  # noqa: E402

pytestmark = [pytest.mark.integration, pytest.mark.slow,
              pytest.mark.skipif(os.geteuid() != 0, reason="needs root")]

SOCKET = "io.containerd.runtime.v2.task/shim-zygote.sock"


@pytest.fixture(scope="module")
def rootfs() -> Iterator[Path]:
    yield from rootfs_dir()


@pytest.fixture
def rt(rootfs: Path) -> Iterator[Runtime]:
    runtime = Runtime("ctrd", rootfs).start()
    try:
        yield runtime
    finally:
        left = runtime.close()
        assert not left, f"left behind: {left}"


def _argv(pid: int) -> list[bytes]:
    return (Path(f"/proc/{pid}/cmdline").read_bytes()).split(b"\0")


def _ppid(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def _shim_pid(rt: Runtime, cid: str) -> int:
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = _argv(int(proc.name))
        except OSError:
            continue
        if b"-id" in argv and cid.encode() in argv and rt.daemon.address.encode() in argv:
            return int(proc.name)
    raise AssertionError(f"no shim for {cid}")


def _zygote_pid(rt: Runtime) -> int:
    assert rt.daemon.proc is not None
    daemon = rt.daemon.proc.pid
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if _ppid(int(proc.name)) == daemon and b"zygote" in _argv(int(proc.name)):
                return int(proc.name)
        except OSError:
            continue
    raise AssertionError("the daemon runs no shim zygote")


def _wait_for(cond, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.05)
    return cond()


def test_shims_come_from_the_zygote(rt: Runtime) -> None:
    sock = rt.daemon.state / SOCKET
    assert _wait_for(sock.is_socket), rt.daemon.log()
    zygote = _zygote_pid(rt)
    cid = rt.new_id()
    rt.run(cid, "/bin/sleep", "1000", flags=("-d",))
    shim = _shim_pid(rt, cid)
    assert rt.daemon.proc is not None
    assert _ppid(shim) not in (rt.daemon.proc.pid, zygote)
    assert _argv(shim)[0] == b"containerd-shim-ctrd-v2"
    assert f"shim_spawned zygote_pid={zygote} pid={shim} " in rt.daemon.log()
    # Recovery and cleanup run the binary itself: the bundle names it as for exec.
    bundle = rt.daemon.state / "io.containerd.runtime.v2.task" / "default" / cid
    assert (bundle / "shim-binary-path").read_text().endswith("/containerd-shim-ctrd-v2")
    r = rt.ctr("tasks", "exec", "--exec-id", "e1", cid, "/bin/sh", "-c", "echo hi; exit 3",
               check=False)
    assert (r.returncode, r.stdout) == (3, "hi\n")
    r = rt.run(rt.new_id(), "/bin/sh", "-c", "exit 5", check=False)
    assert r.returncode == 5, r.stderr


def test_exec_start_when_the_zygote_is_gone(rt: Runtime) -> None:
    sock = rt.daemon.state / SOCKET
    assert _wait_for(sock.is_socket), rt.daemon.log()
    zygote = _zygote_pid(rt)
    # Running but unreachable: the daemon asks, is refused, execs.
    sock.unlink()
    r = rt.run(rt.new_id(), "/bin/sh", "-c", "exit 4", check=False)
    assert r.returncode == 4, r.stderr + rt.daemon.log()
    assert "shim zygote unavailable, exec'ing start" in rt.daemon.log()
    # Dead: the daemon no longer asks.
    os.kill(zygote, signal.SIGKILL)
    assert _wait_for(lambda: "shim zygote exited" in rt.daemon.log()), rt.daemon.log()
    r = rt.run(rt.new_id(), "/bin/sh", "-c", "exit 6", check=False)
    assert r.returncode == 6, r.stderr + rt.daemon.log()
    cid = rt.new_id()
    rt.run(cid, "/bin/sleep", "1000", flags=("-d",))
    shim = _shim_pid(rt, cid)
    assert _argv(shim)[0] != b"containerd-shim-ctrd-v2"
    assert b"start" in _argv(shim)
    rt.ctr("tasks", "kill", "-s", "SIGKILL", cid)
    rt.wait_status(cid, "STOPPED")
    rt.ctr("tasks", "delete", cid)
    rt.ctr("containers", "rm", cid)
