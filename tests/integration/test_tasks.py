"""Tasks through the real `ctr` against ctrd, with each shim (Debian's runc shim, ours).

Every test runs on its own daemon; teardown fails the test if any shim, runc
container, cgroup or mount was left behind.
"""
from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from helpers.procs import shim_pids  # noqa: E402
from helpers.runtime_env import CGROUP_ROOT, SHIMS, Runtime, rootfs_dir  # noqa: E402

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _shim_available(name: str) -> bool:
    from shutil import which
    return which(SHIMS[name], path=f"{Path(sys.executable).parent}:{os.environ['PATH']}") \
        is not None


SHIM_PARAMS = [pytest.param(name, marks=pytest.mark.skipif(
    not _shim_available(name), reason=f"{SHIMS[name]} not installed")) for name in SHIMS]


@pytest.fixture(scope="module")
def rootfs() -> Iterator[Path]:
    yield from rootfs_dir()


@pytest.fixture(params=SHIM_PARAMS)
def rt(request, rootfs: Path) -> Iterator[Runtime]:
    runtime = Runtime(request.param, rootfs).start()
    try:
        yield runtime
    finally:
        left = runtime.close()
        assert not left, f"left behind: {left}"


class Events:
    """`ctr events` in the background, parsed into (topic, event) pairs."""

    def __init__(self, rt: Runtime) -> None:
        d = rt.daemon
        self.proc = subprocess.Popen(["ctr", "--address", d.address, "events"],
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                     text=True, env=d.env())
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        time.sleep(0.5)  # let the subscription reach the daemon

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def topics(self, cid: str) -> list[str]:
        found = []
        for line in list(self.lines):
            parts = line.split(" ", 6)
            if len(parts) == 7 and cid in parts[6]:
                found.append(parts[5])
        return found

    def wait_for(self, cid: str, topic: str, timeout: float = 10) -> list[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if topic in self.topics(cid):
                return self.topics(cid)
            time.sleep(0.1)
        raise AssertionError(f"no {topic} for {cid}; got {self.topics(cid)}")

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()


def _in_pty(rt: Runtime, *args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    """Run `ctr` with a terminal on its stdin, as `-t` requires."""
    cmd = shlex.join(["ctr", "--address", rt.daemon.address, *args])
    return subprocess.run(["script", "-qec", cmd, "/dev/null"], capture_output=True, text=True,
                          timeout=timeout, env=rt.daemon.env(), stdin=subprocess.DEVNULL)


# -- ctr run -----------------------------------------------------------------

def test_run_exit_status(rt: Runtime) -> None:
    cid = rt.new_id()
    r = rt.run(cid, "/bin/sh", "-c", "echo out; exit 3", check=False)
    assert r.returncode == 3, r.stderr
    assert r.stdout == "out\n"
    assert rt.ctr("containers", "ls", "-q").stdout.strip() == ""


def test_run_tty(rt: Runtime) -> None:
    cid = rt.new_id()
    r = _in_pty(rt, "run", "--rm", "-t", "--rootfs", str(rt.rootfs), cid,
                "/bin/sh", "-c", "tty; exit 5")
    assert r.returncode == 5, r.stdout + r.stderr
    assert "/dev/pts/" in r.stdout


def test_run_stdin(rt: Runtime) -> None:
    cid = rt.new_id()
    d = rt.daemon
    proc = subprocess.Popen(["ctr", "--address", d.address, "run", "--rm", "--rootfs",
                             str(rt.rootfs), cid, "/bin/cat"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=d.env())
    # ctr 1.6 only forwards the end of stdin once its task exists, so the input comes late.
    time.sleep(1.0)
    out, err = proc.communicate(b"hi\n", timeout=30)
    assert proc.returncode == 0, err
    assert out == b"hi\n"


def test_run_options(rt: Runtime) -> None:
    cid = rt.new_id()
    r = rt.run(cid, "/bin/sh", "-c", "echo $FOO; pwd; touch /x 2>&1; readlink /proc/self/ns/net",
               flags=("--rm", "--env", "FOO=bar", "--cwd", "/tmp", "--read-only", "--net-host"))
    foo, cwd, touch, netns = r.stdout.splitlines()
    assert (foo, cwd) == ("bar", "/tmp")
    assert "Read-only file system" in touch
    assert netns == os.readlink("/proc/self/ns/net")
    cid = rt.new_id()
    r = rt.run(cid, "/bin/sh", "-c", "readlink /proc/self/ns/net")
    assert r.stdout.strip() != os.readlink("/proc/self/ns/net")


def test_memory_limit(rt: Runtime) -> None:
    cid = rt.new_id()
    rt.run(cid, "/bin/sleep", "1000", flags=("-d", "--memory-limit", str(64 << 20)))
    limit_file = CGROUP_ROOT / "memory" / "default" / cid / "memory.limit_in_bytes"
    if not limit_file.exists():  # cgroup v2
        limit_file = CGROUP_ROOT / "default" / cid / "memory.max"
    assert int(limit_file.read_text()) == 64 << 20
    inside = rt.ctr("tasks", "exec", "--exec-id", "cg", cid, "/bin/cat", "/proc/self/cgroup")
    assert f"/default/{cid}" in inside.stdout
    metrics = rt.ctr("tasks", "metrics", cid).stdout
    assert str(64 << 20) in metrics
    # Update changes the limit of the running task.
    req = _tpb().UpdateTaskRequest(container_id=cid)
    req.resources.type_url = "types.containerd.io/opencontainers/runtime-spec/1/LinuxResources"
    req.resources.value = json.dumps({"memory": {"limit": 128 << 20}}).encode()
    rt.raw.call("Update", req)
    assert int(limit_file.read_text()) == 128 << 20


# -- detached tasks ------------------------------------------------------------

def test_detached_lifecycle(rt: Runtime) -> None:
    cid = rt.new_id()
    events = Events(rt)
    try:
        rt.run(cid, "/bin/sleep", "1000", flags=("-d",))
        assert rt.task_status(cid) == "RUNNING"
        pid = int(rt.ctr("tasks", "ls").stdout.split(cid)[1].split()[0])
        ps = rt.ctr("tasks", "ps", cid).stdout
        assert str(pid) in ps

        r = rt.ctr("tasks", "exec", "--exec-id", "e1", cid, "/bin/sh", "-c", "echo in; exit 2",
                   check=False)
        assert (r.returncode, r.stdout) == (2, "in\n")
        r = _in_pty(rt, "tasks", "exec", "-t", "--exec-id", "e2", cid, "/bin/sh", "-c",
                    "tty; exit 4")
        assert r.returncode == 4 and "/dev/pts/" in r.stdout, r.stdout + r.stderr

        rt.ctr("tasks", "pause", cid)
        assert rt.task_status(cid) == "PAUSED"
        rt.ctr("tasks", "resume", cid)
        assert rt.task_status(cid) == "RUNNING"
        metrics = rt.ctr("tasks", "metrics", cid).stdout
        assert "memory.usage_in_bytes" in metrics or "memory.usage" in metrics

        rt.ctr("tasks", "kill", "-s", "SIGKILL", cid)
        rt.wait_status(cid, "STOPPED")
        rt.ctr("tasks", "delete", cid)
        assert rt.task_status(cid) is None
        rt.ctr("containers", "rm", cid)
        topics = events.wait_for(cid, "/containers/delete")
    finally:
        events.close()
    assert topics == ["/containers/create", "/tasks/create", "/tasks/start",
                      "/tasks/exec-added", "/tasks/exec-started", "/tasks/exit",
                      "/tasks/exec-added", "/tasks/exec-started", "/tasks/exit",
                      "/tasks/paused", "/tasks/resumed", "/tasks/exit", "/tasks/delete",
                      "/containers/delete"]


def test_run_rm_events_in_order(rt: Runtime) -> None:
    cid = rt.new_id()
    events = Events(rt)
    try:
        rt.run(cid, "/bin/true")
        topics = events.wait_for(cid, "/containers/delete")
    finally:
        events.close()
    assert topics == ["/containers/create", "/tasks/create", "/tasks/start", "/tasks/exit",
                      "/tasks/delete", "/containers/delete"]


def test_kill_signal_and_all(rt: Runtime) -> None:
    cid = rt.new_id()
    rt.run(cid, "/bin/sh", "-c", "trap 'exit 42' USR1; while true; do sleep 0.1; done",
           flags=("-d",))
    time.sleep(0.3)
    rt.ctr("tasks", "kill", "-s", "SIGUSR1", cid)
    rt.wait_status(cid, "STOPPED")
    r = rt.raw.call("Wait", _tpb().WaitRequest(container_id=cid))
    assert r.exit_status == 42
    rt.ctr("tasks", "delete", cid)
    rt.ctr("containers", "rm", cid)


# -- faults --------------------------------------------------------------------

def _tpb():
    from ctrd.api.containerd.services.tasks.v1 import tasks_pb2
    return tasks_pb2


def _code(call) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code()


def test_runc_error_reaches_client(rt: Runtime) -> None:
    cid = rt.new_id()
    r = rt.run(cid, "/no/such/binary", check=False)
    assert r.returncode != 0
    assert "/no/such/binary" in r.stderr and "no such file or directory" in r.stderr, r.stderr
    assert rt.task_status(cid) is None


def test_invalid_spec_json(rt: Runtime) -> None:
    assert _code(lambda: rt.raw.create_container(rt.new_id(), b"{not json")) \
        == grpc.StatusCode.INVALID_ARGUMENT


def test_process_errors(rt: Runtime) -> None:
    tpb = _tpb()
    cid = rt.new_id()
    rt.ctr("containers", "create", "--rootfs", str(rt.rootfs), cid, "/bin/sleep", "1000")
    created = rt.raw.call("Create", tpb.CreateTaskRequest(container_id=cid))
    assert created.pid > 0
    # A second task for the same container is refused.
    assert _code(lambda: rt.raw.call("Create", tpb.CreateTaskRequest(container_id=cid))) \
        == grpc.StatusCode.ALREADY_EXISTS
    rt.raw.call("Start", tpb.StartRequest(container_id=cid))
    assert _code(lambda: rt.raw.call("Start", tpb.StartRequest(container_id=cid))) \
        != grpc.StatusCode.OK
    assert rt.task_status(cid) == "RUNNING"

    for method, req in [("Get", tpb.GetRequest(container_id=cid, exec_id="nope")),
                        ("Kill", tpb.KillRequest(container_id=cid, exec_id="nope", signal=9)),
                        ("Start", tpb.StartRequest(container_id=cid, exec_id="nope"))]:
        assert _code(lambda: rt.raw.call(method, req)) == grpc.StatusCode.NOT_FOUND, method

    process = json.dumps({"args": ["/bin/sleep", "100"], "cwd": "/",
                          "env": ["PATH=/bin"], "user": {"uid": 0, "gid": 0}}).encode()
    exec_req = tpb.ExecProcessRequest(container_id=cid, exec_id="e1")
    exec_req.spec.type_url = "types.containerd.io/opencontainers/runtime-spec/1/Process"
    exec_req.spec.value = process
    rt.raw.call("Exec", exec_req)
    assert _code(lambda: rt.raw.call("Exec", exec_req)) == grpc.StatusCode.ALREADY_EXISTS
    rt.raw.call("DeleteProcess", tpb.DeleteProcessRequest(container_id=cid, exec_id="e1"))
    assert _code(lambda: rt.raw.call("Exec", tpb.ExecProcessRequest(container_id=cid))) \
        == grpc.StatusCode.INVALID_ARGUMENT
    # The task cannot be deleted while it runs (runc's shim answers UNKNOWN).
    assert _code(lambda: rt.raw.call("Delete", tpb.DeleteTaskRequest(container_id=cid))) \
        in (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.UNKNOWN)
    assert rt.task_status(cid) == "RUNNING"

    rt.raw.call("Kill", tpb.KillRequest(container_id=cid, signal=9))
    waited = rt.raw.call("Wait", tpb.WaitRequest(container_id=cid))
    assert waited.exit_status == 137
    # Killing a stopped task: the process is gone.
    assert _code(lambda: rt.raw.call("Kill", tpb.KillRequest(container_id=cid, signal=9))) \
        == grpc.StatusCode.NOT_FOUND
    deleted = rt.raw.call("Delete", tpb.DeleteTaskRequest(container_id=cid))
    assert deleted.exit_status == 137 and deleted.pid == created.pid
    assert _code(lambda: rt.raw.call("Get", tpb.GetRequest(container_id=cid))) \
        == grpc.StatusCode.NOT_FOUND


def test_checkpoint_without_image_path(rt: Runtime) -> None:
    cid = rt.new_id()
    rt.run(cid, "/bin/sleep", "1000", flags=("-d",))
    req = _tpb().CheckpointTaskRequest(container_id=cid)
    assert _code(lambda: rt.raw.call("Checkpoint", req)) == grpc.StatusCode.UNIMPLEMENTED
    assert rt.task_status(cid) == "RUNNING"


def test_kill_stopped_task_with_ctr(rt: Runtime) -> None:
    cid = rt.new_id()
    rt.run(cid, "/bin/true", flags=("-d",))
    rt.wait_status(cid, "STOPPED")
    r = rt.ctr("tasks", "kill", cid, check=False)
    assert r.returncode != 0 and "not found" in r.stderr


def _shim_pid(rt: Runtime, cid: str) -> int:
    # The `start` invocation is gone by now: whatever matches is the long-lived shim.
    pids = shim_pids(rt.daemon.address, cid)
    if not pids:
        raise AssertionError(f"no shim for {cid}")
    return pids[0]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_shim_killed(rt: Runtime) -> None:
    cid = rt.new_id()
    rt.run(cid, "/bin/sleep", "1000", flags=("-d",))
    pid = int(rt.ctr("tasks", "ls").stdout.split(cid)[1].split()[0])
    bundle = rt.daemon.state / "io.containerd.runtime.v2.task" / "default" / cid
    socket = (bundle / "address").read_text().strip().removeprefix("unix://")
    events = Events(rt)
    try:
        os.kill(_shim_pid(rt, cid), 9)
        topics = events.wait_for(cid, "/tasks/delete")
    finally:
        events.close()
    assert topics[-2:] == ["/tasks/exit", "/tasks/delete"]
    assert rt.task_status(cid) is None
    deadline = time.monotonic() + 5
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(pid)
    assert not bundle.exists()
    assert not os.path.exists(socket)
    rt.ctr("containers", "rm", cid)


def test_daemon_killed_and_restarted(rt: Runtime) -> None:
    tpb = _tpb()
    ids = [rt.new_id() for _ in range(5)]
    for cid in ids[:4]:
        rt.run(cid, "/bin/sleep", "1000", flags=("-d",))
    rt.run(ids[4], "/bin/sh", "-c", "sleep 2; exit 7", flags=("-d",))
    before = {line.split()[0]: line.split()[1]
              for line in rt.ctr("tasks", "ls").stdout.splitlines()[1:]}
    rt.daemon.kill()
    time.sleep(3)  # the last task exits while the daemon is down
    rt.daemon.start()
    after = {line.split()[0]: (line.split()[1], line.split()[2])
             for line in rt.ctr("tasks", "ls").stdout.splitlines()[1:]}
    for cid in ids[:4]:
        assert after[cid] == (before[cid], "RUNNING")
    assert after[ids[4]] == (before[ids[4]], "STOPPED")
    waited = rt.raw.call("Wait", tpb.WaitRequest(container_id=ids[4]))
    assert waited.exit_status == 7
    r = rt.ctr("tasks", "exec", "--exec-id", "after", ids[0], "/bin/echo", "still here")
    assert r.stdout == "still here\n"
    rt.ctr("tasks", "kill", "-s", "SIGKILL", ids[1])
    assert rt.raw.call("Wait", tpb.WaitRequest(container_id=ids[1])).exit_status == 137


def test_dead_shim_cleaned_up_on_restart(rt: Runtime) -> None:
    cid = rt.new_id()
    rt.run(cid, "/bin/sleep", "1000", flags=("-d",))
    pid = int(rt.ctr("tasks", "ls").stdout.split(cid)[1].split()[0])
    rt.daemon.kill()
    os.kill(_shim_pid(rt, cid), 9)
    rt.daemon.start()
    deadline = time.monotonic() + 10
    bundle = rt.daemon.state / "io.containerd.runtime.v2.task" / "default" / cid
    while (bundle.exists() or _alive(pid)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not bundle.exists() and not _alive(pid)
    assert rt.task_status(cid) is None
    rt.ctr("containers", "rm", cid)


def test_server_side_default_spec(rt: Runtime) -> None:
    """A spec from ctrd's own generator runs under each shim, with its settings applied."""
    from ctrd.oci import spec as oci

    tpb = _tpb()
    cid = rt.new_id()
    script = ("grep -q '^Seccomp:[[:space:]]*2' /proc/self/status || exit 11; "
              "test \"$(id -u):$(id -g)\" = 1:1 || exit 12; test \"$PWD\" = /tmp || exit 13; "
              "test \"$FOO\" = bar || exit 14; grep -q '^NoNewPrivs:[[:space:]]*1' "
              "/proc/self/status || exit 15; touch /x 2>/dev/null && exit 16; exit 0")
    spec = oci.default_spec("default", cid, rootfs=str(rt.rootfs))
    oci.with_image_config(spec, {"Cmd": ["/bin/sh", "-c", script], "Env": ["PATH=/bin"],
                                 "WorkingDir": "/tmp", "User": "daemon"}, rootfs=rt.rootfs)
    spec["process"]["env"].append("FOO=bar")
    oci.with_readonly_rootfs(spec)
    rt.raw.create_container(cid, oci.dumps(spec))
    rt.raw.call("Create", tpb.CreateTaskRequest(container_id=cid))
    rt.raw.call("Start", tpb.StartRequest(container_id=cid))
    assert rt.raw.call("Wait", tpb.WaitRequest(container_id=cid)).exit_status == 0
    rt.raw.call("Delete", tpb.DeleteTaskRequest(container_id=cid))
    rt.ctr("containers", "rm", cid)


def test_publish_binary(rt: Runtime) -> None:
    """What a shim's ``-publish-binary`` call does, through the module's function."""
    from ctrd.api.containerd.events import task_pb2
    from ctrd.protoutil import pack

    if rt.shim != "runc":
        pytest.skip("daemon-side only; one shim is enough")
    events = Events(rt)
    try:
        payload = pack(task_pb2.TaskOOM(container_id="published")).SerializeToString()
        code = ("import sys, io; from ctrd.daemon.runtime.publish import publish; "
                f"sys.exit(publish({rt.daemon.address!r}, 'default', '/tasks/oom', "
                "sys.stdin.buffer))")
        r = subprocess.run([sys.executable, "-c", code], input=payload, capture_output=True,
                           timeout=30)
        assert r.returncode == 0, r.stderr
        assert events.wait_for("published", "/tasks/oom") == ["/tasks/oom"]
    finally:
        events.close()


@pytest.fixture(scope="module")
def image_archive(tmp_path_factory) -> Path:
    from ctrd.oci import writer
    from ctrd.oci.busybox import busybox_image

    path = tmp_path_factory.mktemp("image") / "busybox.tar"
    writer.write_oci_archive(path, {IMAGE: busybox_image()})
    return path


IMAGE = "ctrd.local/busybox:latest"


def test_run_image(rt: Runtime, image_archive: Path) -> None:
    rt.ctr("images", "import", str(image_archive))
    cid = rt.new_id()
    r = rt.ctr("run", "--rm", IMAGE, cid, "sh", "-c", "echo from image; exit 3", check=False)
    assert (r.returncode, r.stdout) == (3, "from image\n"), r.stderr
    # A task created without rootfs mounts gets its container's snapshot.
    tpb = _tpb()
    cid = rt.new_id()
    rt.ctr("containers", "create", IMAGE, cid, "--", "sh", "-c",
           "test -x /bin/busybox && exit 4")
    rt.raw.call("Create", tpb.CreateTaskRequest(container_id=cid))
    rt.raw.call("Start", tpb.StartRequest(container_id=cid))
    assert rt.raw.call("Wait", tpb.WaitRequest(container_id=cid)).exit_status == 4
    rt.raw.call("Delete", tpb.DeleteTaskRequest(container_id=cid))
    rt.ctr("containers", "rm", cid)


def test_graceful_restart_keeps_tasks(rt: Runtime) -> None:
    cid = rt.new_id()
    rt.run(cid, "/bin/sleep", "1000", flags=("-d",))
    pid = rt.ctr("tasks", "ls").stdout.split(cid)[1].split()[0]
    assert rt.daemon.stop() == 0
    rt.daemon.start()
    assert rt.ctr("tasks", "ls").stdout.split(cid)[1].split()[:2] == [pid, "RUNNING"]
