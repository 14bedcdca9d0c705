"""What the test helpers for ctrd and for the reference containerd share: the layout
of a daemon's temporary folder, its log, and running the real `ctr` against it."""
from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

CTR = shutil.which("ctr") or "/usr/bin/ctr"


@dataclass
class DaemonProc:
    base: Path
    proc: subprocess.Popen | None = None

    NAME: ClassVar[str]  # the daemon's name: its socket, its log and its error messages

    @property
    def root(self) -> Path:
        return self.base / "root"

    @property
    def state(self) -> Path:
        return self.base / "state"

    @property
    def address(self) -> str:
        return str(self.base / f"{self.NAME}.sock")

    @property
    def log_path(self) -> Path:
        return self.base / f"{self.NAME}.log"

    def env(self) -> dict[str, str] | None:
        return None  # the test process's own

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-20000:]
        except OSError:
            return ""

    def ctr(self, *args: str, namespace: str = "default", check: bool = True,
            input: str | bytes | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
        cmd = [CTR, "--address", self.address, "--namespace", namespace, *args]
        r = subprocess.run(cmd, capture_output=True, input=input, timeout=timeout,
                           env=self.env(), text=not isinstance(input, bytes))
        if check and r.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} failed ({r.returncode}):\n"
                                 f"stdout: {r.stdout}\nstderr: {r.stderr}\n"
                                 f"--- {self.NAME} log ---\n{self.log()[-5000:]}")
        return r
