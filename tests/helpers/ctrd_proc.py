"""Start and stop a real ctrd daemon for tests, each on its own temporary root."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from .daemon_proc import DaemonProc

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


@dataclass
class CtrdProcess(DaemonProc):
    extra_args: list[str] = field(default_factory=list)
    config_text: str = ""

    NAME = "ctrd"

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        # Shims and ctr are found through PATH; the venv's scripts come first.
        env["PATH"] = f"{BIN}:{env.get('PATH', '/usr/sbin:/usr/bin:/sbin:/bin')}"
        return env

    def start(self, timeout: float = 20.0) -> CtrdProcess:
        cmd = [str(BIN / "ctrd"), "--root", str(self.root), "--state", str(self.state),
               "--address", self.address, "--log-level", "debug", *self.extra_args]
        if self.config_text:
            cfg = self.base / "config.toml"
            cfg.write_text(self.config_text)
            cmd += ["--config", str(cfg)]
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=log, env=self.env(),
                                     start_new_session=True)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ctrd exited {self.proc.returncode}:\n{self.log()}")
            if Path(self.address).is_socket() and self._answers():
                return self
            time.sleep(0.05)
        raise RuntimeError(f"ctrd did not come up in {timeout}s:\n{self.log()}")

    def _answers(self) -> bool:
        return self.ctr("version", check=False, timeout=10).returncode == 0

    def stop(self, timeout: float = 20.0) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def new_base(prefix: str = "ctrd-test-") -> Path:
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
