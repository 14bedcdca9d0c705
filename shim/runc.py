"""The runc command line, as the shim drives it (global flags, then one verb).

Failures raise ``RuncError`` carrying the last error runc wrote to its JSON log,
which is far more useful than its exit status.
"""
from __future__ import annotations

import json
import os
import subprocess
from dataclasses import dataclass
from typing import Any

from ctrd import errors
from ctrd.shim.reaper import Reaper

DEFAULT_ROOT = "/run/containerd/runc"


class RuncError(errors.Unknown):
    pass


@dataclass(slots=True)
class Runc:
    reaper: Reaper
    command: str  # binary name or path
    root: str  # --root (already including the namespace)
    log: str  # --log file (JSON lines)
    systemd_cgroup: bool = False

    def _argv(self, *args: str) -> list[str]:
        argv = [self.command, "--root", self.root, "--log", self.log, "--log-format", "json"]
        if self.systemd_cgroup:
            argv.append("--systemd-cgroup")
        return argv + list(args)

    def _run(self, *args: str, what: str, input: bytes | None = None, **kw: Any) -> bytes:
        try:
            res = self.reaper.run(self._argv(*args), input=input, **kw)
        except FileNotFoundError:
            raise errors.FailedPrecondition(f"{what}: runtime {self.command!r} not found") from None
        if res.status != 0:
            detail = self.last_error() or res.output.decode(errors="replace").strip()
            raise RuncError(f"{what}: {detail or f'exit status {res.status}'}")
        return res.output

    def last_error(self) -> str:
        """The message of the last error-level line of runc's JSON log."""
        message = ""
        try:
            with open(self.log, "rb") as f:
                for line in f:
                    try:
                        entry = json.loads(line)
                    except ValueError:
                        continue
                    if entry.get("level") == "error":
                        message = str(entry.get("msg", "")).strip()
        except OSError:
            pass
        return message

    # The container's stdio fds are handed over verbatim and runc's own output is
    # not captured: a runc init inheriting a capture pipe would keep it open.
    def create(self, id: str, bundle: str, pid_file: str, console_socket: str | None,
               stdio: tuple[int, int, int], no_pivot: bool = False,
               no_new_keyring: bool = False) -> None:
        args = ["create", "--bundle", bundle, "--pid-file", pid_file]
        if console_socket:
            args += ["--console-socket", console_socket]
        if no_pivot:
            args.append("--no-pivot")
        if no_new_keyring:
            args.append("--no-new-keyring")
        self._run(*args, id, what="OCI runtime create failed", stdin=stdio[0],
                  stdout=stdio[1], stderr=stdio[2], capture=False)

    def exec(self, id: str, process_file: str, pid_file: str, console_socket: str | None,
             stdio: tuple[int, int, int]) -> None:
        args = ["exec", "--process", process_file, "--detach", "--pid-file", pid_file]
        if console_socket:
            args += ["--console-socket", console_socket]
        self._run(*args, id, what="OCI runtime exec failed", stdin=stdio[0],
                  stdout=stdio[1], stderr=stdio[2], capture=False)

    def start(self, id: str) -> None:
        self._run("start", id, what="OCI runtime start failed")

    def kill(self, id: str, signal: int, all: bool = False) -> None:
        args = ["kill"] + (["--all"] if all else []) + [id, str(signal)]
        try:
            self._run(*args, what="OCI runtime kill failed")
        except RuncError as exc:
            text = str(exc).lower()
            if "not running" in text or "no such process" in text or "process already finished" in text:
                raise errors.NotFound("process already finished") from None
            if "does not exist" in text:
                raise errors.NotFound("no such container") from None
            raise

    def delete(self, id: str, force: bool = False) -> None:
        args = ["delete"] + (["--force"] if force else []) + [id]
        try:
            self._run(*args, what="failed to delete task")
        except RuncError as exc:
            if "does not exist" not in str(exc):
                raise

    def pause(self, id: str) -> None:
        self._run("pause", id, what="OCI runtime pause failed")

    def resume(self, id: str) -> None:
        self._run("resume", id, what="OCI runtime resume failed")

    def update(self, id: str, resources_json: bytes) -> None:
        self._run("update", "--resources", "-", id, what="OCI runtime update failed",
                  input=resources_json)

    def state(self, id: str) -> dict[str, Any]:
        out = self._run("state", id, what="OCI runtime state failed", stderr=subprocess.DEVNULL)
        return json.loads(out)

    def ps(self, id: str) -> list[int]:
        out = self._run("ps", "--format", "json", id, what="OCI runtime ps failed",
                        stderr=subprocess.DEVNULL)
        return [int(p) for p in json.loads(out or b"[]") or []]

    def stats(self, id: str) -> dict[str, Any]:
        out = self._run("events", "--stats", id, what="OCI runtime stats failed",
                        stderr=subprocess.DEVNULL)
        return json.loads(out).get("data") or {}

    def checkpoint(self, id: str, image_path: str, work_path: str, leave_running: bool,
                   options: list[str]) -> None:
        args = ["checkpoint", "--image-path", image_path, "--work-path", work_path, *options]
        if leave_running:
            args.append("--leave-running")
        self._run(*args, id, what="OCI runtime checkpoint failed")


def which(command: str) -> str | None:
    if os.sep in command:
        return command if os.access(command, os.X_OK) else None
    for d in os.environ.get("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin").split(os.pathsep):
        path = os.path.join(d, command)
        if os.access(path, os.X_OK):
            return path
    return None
