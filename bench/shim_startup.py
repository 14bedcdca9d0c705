"""Shim start-up and memory: our shim (exec'd ``start``, and forked by the zygote)
against Debian's containerd-shim-runc-v2.

    .venv/bin/python bench/shim_startup.py [--runs 10] [--containers 10] [--concurrent 20]

Without any daemon: a throwaway ttrpc events endpoint stands in for the daemon's
TTRPC_ADDRESS, shims are started the way a daemon starts them and driven over ttrpc.

- start: ``<shim> start`` returning its address (exec), or the zygote's answer;
  connect: until the first Connect call is answered (the shim really serves).
- concurrent: N shims started at once, wall time until all answered Connect.
- memory: N real busybox containers (``sleep``) running, one shim each: RSS and PSS
  of each shim from /proc/PID/smaps_rollup (PSS splits shared pages among sharers,
  so shims forked from one zygote count what they really add), and the zygote's own.

Run as root (runc). Everything is removed at the end: shims, containers, folders.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from google.protobuf import empty_pb2

from ctrd.api.containerd.runtime.task.v2 import shim_pb2
from ctrd.shim.zygote import SpawnRequest, spawn_via_zygote
from ctrd.ttrpc.blocking import Client, Server

OURS = str(Path(sys.executable).with_name("containerd-shim-ctrd-v2"))
GO = shutil.which("containerd-shim-runc-v2") or "/usr/bin/containerd-shim-runc-v2"
TASK = "containerd.task.v2.Task"
NAMESPACE = "shimbench"
DAEMON_ADDRESS = "/run/shimbench-daemon.sock"  # only names the shims' sockets


class Bench:
    def __init__(self, base: Path) -> None:
        self.base = base
        self.state = base / "state"
        self.rootfs = base / "rootfs"
        self.events_sock = str(base / "events.sock")
        self.zygote_sock = str(base / "zygote.sock")
        self.clients: list[Client] = []
        self.log_fds: list[int] = []
        self.zygote: subprocess.Popen[bytes] | None = None
        self.events = Server()
        self.events.register("containerd.services.events.ttrpc.v1.Events",
                             {"Forward": lambda ctx, payload: b""})
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(self.events_sock)
        listener.listen(128)
        self.events.serve_in_thread(listener)

    # -- bundles ----------------------------------------------------------------

    def bundle(self, id: str, args: list[str] | None = None) -> Path:
        path = self.state / NAMESPACE / id
        path.mkdir(parents=True)
        spec: dict[str, object] = {}
        if args:
            spec = _spec(path)
            spec["process"]["args"] = args  # type: ignore[index]
            spec["process"]["terminal"] = False  # type: ignore[index]
            spec["root"] = {"path": str(self.rootfs), "readonly": True}
        (path / "config.json").write_text(json.dumps(spec))
        # The Go shim will not run without the log fifo, and blocks until it has a reader.
        os.mkfifo(path / "log", 0o700)
        self.log_fds.append(os.open(path / "log", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC))
        return path

    def make_rootfs(self) -> None:
        from ctrd.oci.busybox import applets

        (self.rootfs / "bin").mkdir(parents=True)
        for d in ("dev", "proc", "sys", "tmp", "etc"):
            (self.rootfs / d).mkdir()
        shutil.copy2("/bin/busybox", self.rootfs / "bin/busybox")
        for name in applets():
            if not (self.rootfs / "bin" / name).exists():
                (self.rootfs / "bin" / name).symlink_to("busybox")

    # -- starting shims ------------------------------------------------------------

    def env(self) -> dict[str, str]:
        return dict(os.environ, TTRPC_ADDRESS=self.events_sock, GRPC_ADDRESS=DAEMON_ADDRESS,
                    NAMESPACE=NAMESPACE)

    def exec_start(self, binary: str, id: str, bundle: Path) -> str:
        out = subprocess.run([binary, "-namespace", NAMESPACE, "-address", DAEMON_ADDRESS,
                              "-publish-binary", "/bin/true", "-id", id, "start"],
                             cwd=bundle, env=self.env(), capture_output=True, check=True)
        return out.stdout.decode().strip()

    def start_zygote(self) -> None:
        self.zygote = subprocess.Popen([OURS, "zygote", "-socket", self.zygote_sock,
                                        "-state", str(self.state)], stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            s = socket.socket(socket.AF_UNIX)
            try:
                s.connect(self.zygote_sock)
                return
            except OSError:
                time.sleep(0.02)
            finally:
                s.close()
        raise RuntimeError("zygote did not come up")

    def request(self, id: str, bundle: Path) -> SpawnRequest:
        return SpawnRequest(NAMESPACE, id, str(bundle), DAEMON_ADDRESS, self.events_sock,
                            env=self.env())

    def zygote_start(self, id: str, bundle: Path) -> str:
        return asyncio.run(spawn_via_zygote(self.zygote_sock, self.request(id, bundle)))

    def connect(self, address: str, id: str) -> tuple[Client, int]:
        client = Client.connect(address)
        self.clients.append(client)
        r = client.call(TASK, "Connect", shim_pb2.ConnectRequest(id=id), shim_pb2.ConnectResponse)
        return client, r.shim_pid

    # -- measurements ----------------------------------------------------------------

    def latency(self, mode: str, runs: int) -> tuple[list[float], list[float]]:
        starts, connects = [], []
        for i in range(runs):
            id = f"lat-{mode}-{i}-{uuid.uuid4().hex[:6]}"
            bundle = self.bundle(id)
            t0 = time.perf_counter()
            address = self.start(mode, id, bundle)
            t1 = time.perf_counter()
            client, _ = self.connect(address, id)
            t2 = time.perf_counter()
            starts.append(t1 - t0)
            connects.append(t2 - t0)
            self.shutdown(client, id)
        return starts, connects

    def start(self, mode: str, id: str, bundle: Path) -> str:
        if mode == "zygote":
            return self.zygote_start(id, bundle)
        return self.exec_start(OURS if mode == "exec" else GO, id, bundle)

    def concurrent(self, mode: str, n: int) -> float:
        ids = [f"con-{mode}-{i}-{uuid.uuid4().hex[:6]}" for i in range(n)]
        bundles = [self.bundle(id) for id in ids]

        async def one(id: str, bundle: Path) -> tuple[Client, str]:
            if mode == "zygote":
                address = await spawn_via_zygote(self.zygote_sock, self.request(id, bundle))
            else:
                proc = await asyncio.create_subprocess_exec(
                    OURS if mode == "exec" else GO, "-namespace", NAMESPACE, "-address",
                    DAEMON_ADDRESS, "-publish-binary", "/bin/true", "-id", id, "start",
                    cwd=bundle, env=self.env(), stdout=asyncio.subprocess.PIPE,
                    stdin=asyncio.subprocess.DEVNULL)
                out, _ = await proc.communicate()
                address = out.decode().strip()
            client, _ = await asyncio.to_thread(self.connect, address, id)
            return client, id

        async def all_of() -> list[tuple[Client, str]]:
            return await asyncio.gather(*(one(i, b) for i, b in zip(ids, bundles)))

        t0 = time.perf_counter()
        started = asyncio.run(all_of())
        elapsed = time.perf_counter() - t0
        for client, id in started:
            self.shutdown(client, id)
        return elapsed

    def memory(self, mode: str, n: int) -> list[dict[str, int]]:
        running: list[tuple[Client, str, int]] = []
        try:
            for i in range(n):
                id = f"mem-{mode}-{i}-{uuid.uuid4().hex[:6]}"
                bundle = self.bundle(id, ["sleep", "600"])
                client, pid = self.connect(self.start(mode, id, bundle), id)
                running.append((client, id, pid))
                client.call(TASK, "Create", shim_pb2.CreateTaskRequest(id=id, bundle=str(bundle)),
                            shim_pb2.CreateTaskResponse)
                client.call(TASK, "Start", shim_pb2.StartRequest(id=id), shim_pb2.StartResponse)
            time.sleep(1.0)  # let the shims settle (threads started, first events sent)
            return [smaps(pid) for _, _, pid in running]
        finally:
            for client, id, _ in running:
                self.stop_task(client, id)

    def stop_task(self, client: Client, id: str) -> None:
        try:
            client.call(TASK, "Kill", shim_pb2.KillRequest(id=id, signal=9, all=True),
                        empty_pb2.Empty, timeout=10)
            client.call(TASK, "Wait", shim_pb2.WaitRequest(id=id), shim_pb2.WaitResponse,
                        timeout=10)
            client.call(TASK, "Delete", shim_pb2.DeleteRequest(id=id), shim_pb2.DeleteResponse,
                        timeout=10)
        except Exception as exc:  # keep tearing down the others
            print(f"cleanup of {id}: {exc}", file=sys.stderr)
        self.shutdown(client, id)

    def shutdown(self, client: Client, id: str) -> None:
        try:
            client.call(TASK, "Shutdown", shim_pb2.ShutdownRequest(id=id), empty_pb2.Empty,
                        timeout=5)
        except Exception:
            pass  # the shim closes the connection as it exits
        client.close()

    def close(self) -> None:
        for client in self.clients:
            client.close()
        if self.zygote is not None and self.zygote.poll() is None:
            self.zygote.send_signal(signal.SIGTERM)
            self.zygote.wait(10)
        self.events.shutdown()
        for fd in self.log_fds:
            os.close(fd)
        shutil.rmtree(f"/run/containerd/runc/{NAMESPACE}", ignore_errors=True)
        shutil.rmtree(self.base, ignore_errors=True)


def _spec(bundle: Path) -> dict:
    """runc's default spec (namespaces, mounts, capabilities), written by ``runc spec``."""
    subprocess.run(["runc", "spec", "--bundle", str(bundle)], check=True, capture_output=True)
    path = bundle / "config.json"
    spec = json.loads(path.read_text())
    path.unlink()
    return spec


def smaps(pid: int) -> dict[str, int]:
    out = {}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            parts = line.split()
            if parts[0] in ("Rss:", "Pss:", "Private_Dirty:", "Shared_Clean:"):
                out[parts[0].rstrip(":")] = int(parts[1])
    return out


def ms(values: list[float]) -> str:
    return f"median {1000 * statistics.median(values):6.1f} ms  min {1000 * min(values):6.1f} ms"


def mib(kib: float) -> str:
    return f"{kib / 1024:5.1f} MiB"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--containers", type=int, default=10)
    ap.add_argument("--concurrent", type=int, default=20)
    args = ap.parse_args()
    bench = Bench(Path(tempfile.mkdtemp(prefix="shimbench-", dir="/tmp")))
    modes: dict[str, str] = {"go": "containerd-shim-runc-v2", "exec": "ours, exec'd start",
                             "zygote": "ours, zygote fork"}
    try:
        bench.make_rootfs()
        bench.start_zygote()
        assert bench.zygote is not None
        print(f"start latency ({args.runs} runs, sequential)")
        for mode, label in modes.items():
            starts, connects = bench.latency(mode, args.runs)
            print(f"  {label:24s} start {ms(starts)}   start+Connect {ms(connects)}")
        print(f"{args.concurrent} shims started at once, until every Connect answered")
        for mode, label in modes.items():
            print(f"  {label:24s} {1000 * bench.concurrent(mode, args.concurrent):7.1f} ms")
        print(f"memory per shim, {args.containers} running busybox containers")
        for mode, label in modes.items():
            samples = bench.memory(mode, args.containers)
            rss = statistics.mean(s["Rss"] for s in samples)
            pss = statistics.mean(s["Pss"] for s in samples)
            dirty = statistics.mean(s["Private_Dirty"] for s in samples)
            line = f"  {label:24s} RSS {mib(rss)}  PSS {mib(pss)}  private dirty {mib(dirty)}"
            if mode == "zygote":
                z = smaps(bench.zygote.pid)
                share = z["Pss"] / args.containers
                line += (f"\n  {'':24s} zygote RSS {mib(z['Rss'])}  PSS {mib(z['Pss'])}; "
                         f"PSS per shim with the zygote's share: {mib(pss + share)}")
            print(line)
    finally:
        bench.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
