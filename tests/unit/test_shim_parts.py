"""Pieces of the shim that need no container: flags, reaping, stdio copying, mounts
options, metrics shaping, bundle helpers."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import threading
import time

import pytest

from ctrd.shim import cgroups
from ctrd.shim.log import Logger
from ctrd.shim.main import parse
from ctrd.shim.mount import MS_BIND, MS_RDONLY, MS_REC, parse_options
from ctrd.shim.reaper import Exit, Reaper, exit_status
from ctrd.shim.start import socket_address
from ctrd.shim.stdio import PipeIO, Stdio


def test_flags_follow_go_conventions() -> None:
    f = parse(["-namespace", "ns", "--id=abc", "-address", "/a.sock", "-publish-binary",
               "/bin/containerd", "-debug", "start"])
    assert (f.namespace, f.id, f.address, f.debug, f.action) == ("ns", "abc", "/a.sock", True, "start")
    assert parse(["-namespace=n", "-debug=false", "delete"]).debug is False
    with pytest.raises(SystemExit):
        parse(["-bogus", "x"])


def test_socket_address_matches_containerd_scheme() -> None:
    import hashlib

    digest = hashlib.sha256(b"/run/containerd/containerd.sock/default/c1").hexdigest()
    assert socket_address("/run/containerd/containerd.sock", "default", "c1") == \
        f"unix:///run/containerd/s/{digest}"


def test_exit_status_encoding() -> None:
    assert exit_status(3 << 8) == 3
    assert exit_status(signal.SIGKILL) == 137


def test_reaper_hands_exits_to_commands_and_others() -> None:
    others: list[Exit] = []
    reaper = Reaper(others.append)
    stop = threading.Event()

    def loop() -> None:  # stands in for the SIGCHLD-driven main loop
        while not stop.is_set():
            reaper.reap()
            stop.wait(0.01)

    t = threading.Thread(target=loop)
    t.start()
    try:
        stray = subprocess.Popen([sys.executable, "-c", "raise SystemExit(4)"])
        res = reaper.run(["sh", "-c", "echo out; echo err >&2; exit 2"])
        assert res.status == 2 and res.output == b"out\nerr\n"
        assert reaper.run(["cat"], input=b"abc").output == b"abc"
        for _ in range(200):
            if others:
                break
            stop.wait(0.01)
        assert [(e.pid, e.status) for e in others] == [(stray.pid, 4)]
        stray.returncode = 4  # reaped by us, not by Popen
    finally:
        stop.set()
        t.join()


def test_inactive_reaper_waits_directly() -> None:
    assert Reaper(lambda e: None, active=False).run(["sh", "-c", "exit 9"]).status == 9


def test_pipe_io_copies_to_fifos_and_honours_close_io() -> None:
    with tempfile.TemporaryDirectory() as d:
        paths = {n: os.path.join(d, n) for n in ("in", "out", "err")}
        for p in paths.values():
            os.mkfifo(p)
        out_r = os.open(paths["out"], os.O_RDONLY | os.O_NONBLOCK)
        err_r = os.open(paths["err"], os.O_RDONLY | os.O_NONBLOCK)
        pio = PipeIO(Stdio(paths["in"], paths["out"], paths["err"]), os.getuid(), os.getgid(),
                     Logger(level="error"))
        proc = subprocess.Popen(["sh", "-c", "cat; echo bye >&2"], stdin=pio.fds[0],
                                stdout=pio.fds[1], stderr=pio.fds[2])
        pio.start_copy()
        pio.start_stdin()
        client_w = os.open(paths["in"], os.O_WRONLY)
        os.write(client_w, b"hello\n")
        os.close(client_w)  # the client is done, but the shim's own writer keeps stdin open
        assert proc.poll() is None
        assert pio.stdin_fifo is not None
        pio.stdin_fifo.close_writer()  # CloseIO
        assert proc.wait(10) == 0
        pio.wait(5)
        for fd in (out_r, err_r):
            os.set_blocking(fd, True)
        assert os.read(out_r, 100) == b"hello\n" and os.read(err_r, 100) == b"bye\n"
        assert os.read(out_r, 100) == b""  # the shim closed its end: the client sees EOF
        pio.close()
        os.close(out_r)
        os.close(err_r)


def test_pipe_io_one_copier_for_a_shared_destination() -> None:
    """stdout and stderr to the same fifo, copied by one thread: both arrive, and the
    client sees EOF only once both streams ended."""
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "out")
        os.mkfifo(out)
        out_r = os.open(out, os.O_RDONLY | os.O_NONBLOCK)
        before = threading.active_count()
        pio = PipeIO(Stdio("", out, out), os.getuid(), os.getgid(), Logger(level="error"))
        proc = subprocess.Popen(
            ["sh", "-c", "echo one; exec 1>&-; sleep 0.3; echo two >&2"],
            stdin=pio.fds[0], stdout=pio.fds[1], stderr=pio.fds[2])
        pio.start_copy()
        assert threading.active_count() == before + 1
        assert proc.wait(10) == 0
        pio.wait(5)
        os.set_blocking(out_r, True)
        data = b""
        while chunk := os.read(out_r, 100):
            data += chunk
        assert data == b"one\ntwo\n"
        pio.close()
        os.close(out_r)


def test_stdin_copier_starts_on_first_data_only() -> None:
    """With the main loop's selector, a stdin nobody writes to costs no thread."""
    import selectors

    with tempfile.TemporaryDirectory() as d, selectors.DefaultSelector() as sel:
        stdin = os.path.join(d, "in")
        os.mkfifo(stdin)
        stop = threading.Event()

        def main_loop() -> None:
            while not stop.is_set():
                for key, _ in sel.select(0.05):
                    key.data(key.fd)

        loop = threading.Thread(target=main_loop)
        loop.start()
        try:
            pio = PipeIO(Stdio(stdin, "", ""), os.getuid(), os.getgid(), Logger(level="error"),
                         sel)
            proc = subprocess.Popen(["cat"], stdin=pio.fds[0], stdout=subprocess.PIPE)
            pio.start_copy()
            before = threading.active_count()
            pio.start_stdin()
            time.sleep(0.2)
            assert threading.active_count() == before  # waiting on the selector only
            client = os.open(stdin, os.O_WRONLY)
            os.write(client, b"late\n")
            os.close(client)
            assert proc.stdout is not None
            assert proc.stdout.readline() == b"late\n"
            assert pio.stdin_fifo is not None
            pio.stdin_fifo.close_writer()  # CloseIO: cat sees EOF
            assert proc.wait(10) == 0
            pio.close()

            # Never written to: close() releases both ends without a thread.
            idle = PipeIO(Stdio(stdin, "", ""), os.getuid(), os.getgid(), Logger(level="error"),
                          sel)
            fds_before = set(os.listdir("/proc/self/fd"))
            proc = subprocess.Popen(["sleep", "0"], stdin=idle.fds[0])
            idle.start_copy()
            idle.start_stdin()
            assert proc.wait(10) == 0
            idle.close()
            assert len(sel.get_map()) == 0
            assert set(os.listdir("/proc/self/fd")) <= fds_before
        finally:
            stop.set()
            loop.join(5)


def test_mount_options() -> None:
    flags, data = parse_options(("rbind", "ro", "lowerdir=/a"))
    assert flags == MS_BIND | MS_REC | MS_RDONLY and data == "lowerdir=/a"
    assert parse_options(("ro", "rw"))[0] == 0


def test_metrics_from_runc_stats() -> None:
    stats = {"cpu": {"usage": {"total": 5000, "percpu": [2000, 3000], "kernel": 10, "user": 20}},
             "memory": {"usage": {"usage": 4096, "limit": 8192}, "raw": {"rss": 7, "pgpgin": 3}},
             "pids": {"current": 2}}
    v1 = cgroups.metrics(stats, v2=False)
    assert v1.DESCRIPTOR.full_name == "io.containerd.cgroups.v1.Metrics"
    assert list(v1.cpu.usage.per_cpu) == [2000, 3000] and v1.memory.usage.usage == 4096
    assert v1.memory.rss == 7 and v1.memory.pg_pg_in == 3 and v1.pids.current == 2
    v2 = cgroups.metrics(stats, v2=True)
    assert v2.cpu.usage_usec == 5 and v2.memory.usage == 4096 and v2.memory.usage_limit == 8192
