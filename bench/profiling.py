"""Profile mode: where ctrd spends its time while a workload runs.

With py-spy, each workload gets a flame graph of the daemon (and of one of its
shims when a Python shim is running). Without it, the daemon runs under cProfile
for the whole bench and its profile is summarised at the end; cProfile sees the
daemon's main thread only, so work sent to threads shows up as waiting.
"""
from __future__ import annotations

import contextlib
import io
import pstats
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import structlog

from .daemons import VENV_BIN, Daemon

log = structlog.get_logger()


def _py_spy() -> str | None:
    local = VENV_BIN / "py-spy"
    return str(local) if local.exists() else shutil.which("py-spy")


@dataclass
class Profiler:
    outdir: Path
    tool: str = "auto"  # "auto" (py-spy when installed), "py-spy" or "cprofile"

    def __post_init__(self) -> None:
        self.py_spy = None if self.tool == "cprofile" else _py_spy()
        if self.tool == "py-spy" and self.py_spy is None:
            raise RuntimeError("py-spy is not installed (pip install py-spy)")
        self.cprofile_out = self.outdir / "ctrd.cprofile"
        self.outdir.mkdir(parents=True, exist_ok=True)

    @property
    def mode(self) -> str:
        return "py-spy" if self.py_spy else "cProfile"

    def wrapper(self) -> list[str]:
        """How to start ctrd: plainly under py-spy (it attaches later), else under cProfile."""
        if self.py_spy:
            return []
        return [sys.executable, "-m", "cProfile", "-o", str(self.cprofile_out),
                "-m", "ctrd.daemon.entry"]

    @contextlib.contextmanager
    def during(self, workload: str, daemon: Daemon) -> Iterator[None]:
        if not self.py_spy:
            yield
            return
        targets = [("daemon", daemon.pid)]
        shims = [pid for pid in daemon.shim_pids() if _is_python(pid)]
        if shims:
            targets.append(("shim", shims[0]))
        recorders = []
        for role, pid in targets:
            out = self.outdir / f"{workload}-{role}.svg"
            recorders.append(subprocess.Popen(
                # Shims the daemon starts as children are followed; daemonised ones are not.
                [self.py_spy, "record", "--pid", str(pid), "--output", str(out),
                 "--format", "flamegraph", "--rate", "200", "--subprocesses"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True))
        try:
            yield
        finally:
            for recorder in recorders:
                # py-spy writes its output when interrupted.
                recorder.send_signal(signal.SIGINT)
                try:
                    recorder.wait(30)
                except subprocess.TimeoutExpired:
                    recorder.kill()
                    recorder.wait()
            log.info("profiles written", workload=workload, folder=str(self.outdir))

    def summary(self, top: int = 25) -> str:
        """The cProfile hot spots, once the daemon has exited and written them."""
        if self.py_spy:
            return f"py-spy flame graphs: {self.outdir}/*.svg"
        if not self.cprofile_out.exists():
            return "cProfile wrote no profile (did ctrd exit cleanly?)"
        text = io.StringIO()
        stats = pstats.Stats(str(self.cprofile_out), stream=text)
        stats.sort_stats("tottime").print_stats(top)
        return f"cProfile of ctrd ({self.cprofile_out}):\n{text.getvalue()}"


def _is_python(pid: int) -> bool:
    try:
        return b"python" in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0]
    except OSError:
        return False
