"""The two daemons under test, each on its own temporary root, state and socket.

Both are driven the same way: the real `ctr` (or a gRPC client from ctrd.api) on
the daemon's socket, in a namespace of the benchmark's own so that nothing it makes
can collide with other users of the machine's runc and cgroups. Both serve CRI too,
configured alike: the bench's pause image, and a CNI network of the daemon's own.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import structlog

from .cri import CNI_BIN_DIR, PAUSE_IMAGE, PodNetwork

NAMESPACE = "ctrd-bench"
VENV_BIN = Path(sys.executable).parent

log = structlog.get_logger()


class CommandFailed(RuntimeError):
    """A client command exited non-zero; ``reason`` is its last line of output."""

    def __init__(self, cmd: list[str], returncode: int, output: str) -> None:
        lines = [line for line in output.strip().splitlines() if line.strip()]
        self.reason = lines[-1] if lines else f"exit status {returncode}"
        super().__init__(f"{' '.join(cmd[:6])}...: {self.reason}")


@dataclass
class Daemon:
    """A daemon process, started in its own session so Ctrl-C reaches only the bench."""

    name: ClassVar[str]  # "ctrd" or "containerd": the column it fills
    base: Path
    proc: subprocess.Popen | None = None
    # Runs the daemon under a profiler: replaces the executable, keeps the arguments.
    wrapper: list[str] = field(default_factory=list)
    # Its CRI pods' network; chosen at the first start, kept over a restart.
    network: PodNetwork | None = None

    @property
    def address(self) -> str:
        return str(self.base / f"{self.name}.sock")

    @property
    def log_path(self) -> Path:
        return self.base / f"{self.name}.log"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def command(self) -> list[str]:
        raise NotImplementedError

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        # ctrd's shim and ctrctl are found through PATH; the venv's scripts come first.
        env["PATH"] = f"{VENV_BIN}:{env.get('PATH', '/usr/sbin:/usr/bin:/sbin:/bin')}"
        return env

    def start(self, timeout: float = 30.0) -> None:
        self.base.mkdir(parents=True, exist_ok=True)
        if self.network is None:
            self.network = PodNetwork.for_daemon(self.base / "cri", even=self.name == "ctrd")
        self.network.write()
        with open(self.log_path, "ab") as out:
            argv = self.command()
            if self.wrapper:
                argv = [*self.wrapper, *argv[1:]]
            self.proc = subprocess.Popen(argv, stdout=out,
                                         stderr=out, env=self.env(), start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited {self.proc.returncode}:\n{self.log()}")
            if Path(self.address).is_socket() and self.ctr("version", check=False).returncode == 0:
                log.info("daemon up", daemon=self.name, pid=self.proc.pid, address=self.address)
                return
            time.sleep(0.05)
        raise RuntimeError(f"{self.name} did not come up in {timeout}s:\n{self.log()}")

    def stop(self, timeout: float = 30.0) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                log.warning("daemon ignored SIGTERM, killing", daemon=self.name,
                            pid=self.proc.pid)
                self.proc.kill()
                self.proc.wait()
        if self.network is not None:
            self.network.remove()

    def config_path(self) -> Path:
        return self.base / "config.toml"

    def cri_network(self) -> PodNetwork:
        assert self.network is not None, "the network is chosen when the daemon starts"
        return self.network

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-5000:]
        except OSError:
            return ""

    def ctr_cmd(self, *args: str, namespace: str = NAMESPACE) -> list[str]:
        return ["ctr", "--address", self.address, "--namespace", namespace, *args]

    def ctr(self, *args: str, check: bool = True, stdin=None, stdout=subprocess.PIPE,
            timeout: float = 600, namespace: str = NAMESPACE) -> subprocess.CompletedProcess:
        cmd = self.ctr_cmd(*args, namespace=namespace)
        result = subprocess.run(cmd, stdin=stdin, stdout=stdout, stderr=subprocess.PIPE,
                                env=self.env(), timeout=timeout)
        if check and result.returncode != 0:
            output = (result.stdout or b"").decode(errors="replace") if stdout is subprocess.PIPE \
                else ""
            raise CommandFailed(cmd, result.returncode,
                                output + result.stderr.decode(errors="replace"))
        return result

    def shim_pids(self) -> list[int]:
        """Shims serving this daemon: they are told its socket on their command line
        (the script is the third word when the interpreter has flags: ``python -IS``)."""
        pids = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                argv = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if any(arg.startswith(b"containerd-shim") or b"/containerd-shim" in arg
                   for arg in argv[:3]) and self.address.encode() in argv:
                pids.append(int(entry.name))
        return pids

    def child_pids(self) -> list[int]:
        """The daemon's own children (ctrd's shim zygote; shims are not among them)."""
        pids = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == self.pid:
                pids.append(int(entry.name))
        return pids


@dataclass
class Ctrd(Daemon):
    name = "ctrd"

    def command(self) -> list[str]:
        network = self.cri_network()
        self.config_path().write_text(f"""\
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{PAUSE_IMAGE}"
  netns_dir = "{network.netns_dir}"
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{CNI_BIN_DIR}"
    conf_dir = "{network.conf_dir}"
    cache_dir = "{network.cache_dir}"
""")
        return [str(VENV_BIN / "ctrd"), "--config", str(self.config_path()),
                "--root", str(self.base / "root"), "--state", str(self.base / "state"),
                "--address", self.address, "--log-level", "warn"]


@dataclass
class Containerd(Daemon):
    """Debian's containerd, written to nothing outside its temporary base but libcni's
    cache (/var/lib/cni/results, which containerd 1.6 has no setting for)."""

    name = "containerd"

    def command(self) -> list[str]:
        network = self.cri_network()
        # CRI's network namespaces go under its state folder rather than /var/run/netns.
        # AppArmor off, as ctrd has none: on a host with it enabled, containerd would
        # load its default profile into the kernel and confine the pods with it.
        # containerd gives the pause process an oom_score_adj of -998, which a root
        # without CAP_SYS_RESOURCE (the bench's machine runs without it) may not set:
        # runc then fails every pod. Restricted, the score is clamped to containerd's
        # own; ctrd sets none, so its pause process keeps its shim's.
        self.config_path().write_text(f"""\
version = 2
root = "{self.base / 'root'}"
state = "{self.base / 'state'}"

[grpc]
  address = "{self.address}"

[plugins."io.containerd.internal.v1.opt"]
  path = "{self.base / 'opt'}"

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{PAUSE_IMAGE}"
  netns_mounts_under_state_dir = true
  disable_apparmor = true
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{CNI_BIN_DIR}"
    conf_dir = "{network.conf_dir}"
""")
        return ["containerd", "--config", str(self.config_path()), "--log-level", "warn"]


@dataclass
class ContainerdAsCtrd(Containerd):
    """A second containerd in ctrd's column: an A/A run shows how noisy the ratios are."""

    name = "ctrd"

    @property
    def address(self) -> str:
        return str(self.base / "containerd-a.sock")
