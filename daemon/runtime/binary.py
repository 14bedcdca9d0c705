"""Running a shim binary: name resolution, ``start`` and ``delete``, as containerd does.

The command line and environment match containerd 1.6 (runtime/v2/shim/util.go) so
that any shim v2, ours or containerd's ``containerd-shim-runc-v2``, can serve us:
``<shim> -namespace NS -address SOCK -publish-binary CTRD -id ID [-debug] start``
run in the bundle folder, runtime options on stdin, the shim's address on stdout.
"""
from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import structlog
from google.protobuf import any_pb2

from ctrd.api.containerd.runtime.task.v2 import shim_pb2
from ctrd.errors import FailedPrecondition, InvalidArgument, NotFound

from .bundle import Bundle

log = structlog.get_logger()
BINARY_PATH_FILE = "shim-binary-path"


def binary_name(runtime: str) -> str:
    """``io.containerd.runc.v2`` -> ``containerd-shim-runc-v2`` (containerd's rule)."""
    parts = runtime.split(".")
    if len(parts) < 2:
        return ""
    return f"containerd-shim-{parts[-2]}-{parts[-1]}"


def resolve(runtime: str, shims: Mapping[str, str], search_dirs: tuple[str, ...] = ()) -> str:
    """The absolute path of the shim serving ``runtime``.

    The configured table wins; otherwise containerd's naming rule applies. A name is
    looked up in PATH, then beside the daemon's own executable."""
    if not runtime:
        raise InvalidArgument("no runtime name")
    if os.path.isabs(runtime):
        if not os.path.exists(runtime):
            raise NotFound(f"invalid custom binary path: {runtime}: not found")
        return runtime
    name = shims.get(runtime) or binary_name(runtime)
    if not name:
        raise InvalidArgument(
            f"invalid runtime name {runtime}, correct runtime name should be either format "
            "like `io.containerd.runc.v1` or a full path to the binary")
    if os.path.isabs(name):
        if not os.path.exists(name):
            raise NotFound(f"runtime {runtime!r} binary not installed {name!r}")
        return name
    found = shutil.which(name)
    if found is None:
        for d in search_dirs:
            candidate = os.path.join(d, name)
            if os.access(candidate, os.X_OK):
                found = candidate
                break
    if found is None:
        raise NotFound(f"runtime {runtime!r} binary not installed {name!r}")
    return os.path.abspath(found)


@dataclass(frozen=True)
class ShimCommand:
    """What every invocation of a shim binary shares."""

    binary: str
    daemon_address: str
    ttrpc_address: str
    publish_binary: str
    debug: bool = False

    def _argv(self, bundle: Bundle, *args: str) -> list[str]:
        return [self.binary, "-namespace", bundle.namespace, "-address", self.daemon_address,
                "-publish-binary", self.publish_binary, *args]

    def env(self, bundle: Bundle) -> dict[str, str]:
        """The environment of every invocation, and of a shim the zygote forks."""
        env = dict(os.environ)
        env.update({
            "TTRPC_ADDRESS": self.ttrpc_address,
            "GRPC_ADDRESS": self.daemon_address,
            "NAMESPACE": bundle.namespace,
            # containerd sets it so Go shims do not start a thread per core.
            "GOMAXPROCS": env.get("GOMAXPROCS", "2"),
        })
        return env

    async def start(self, bundle: Bundle, options: any_pb2.Any | None,
                    timeout: float) -> str:
        """Run ``start``; returns the address the long-lived shim serves on."""
        args = ["-id", bundle.id] + (["-debug"] if self.debug else []) + ["start"]
        stdin = options.SerializeToString() if options is not None else b""
        proc = await asyncio.create_subprocess_exec(
            *self._argv(bundle, *args), cwd=bundle.path, env=self.env(bundle),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT, process_group=0)
        try:
            out, _ = await asyncio.wait_for(proc.communicate(stdin), timeout)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise FailedPrecondition(f"shim {self.binary} start: no answer in {timeout}s") from None
        text = out.decode(errors="replace").strip()
        if proc.returncode != 0:
            raise FailedPrecondition(f"{text}: exit status {proc.returncode}")
        if not text:
            raise FailedPrecondition(f"shim {self.binary} start printed no address")
        self.record(bundle)
        return text

    def record(self, bundle: Bundle) -> None:
        """Note the binary in the bundle: recovery and cleanup run the same one even if
        the runtime table changed since."""
        bundle.file(BINARY_PATH_FILE).write_text(self.binary)

    async def delete(self, bundle: Bundle, timeout: float) -> shim_pb2.DeleteResponse:
        """Run ``delete``: the shim binary cleans up after its dead long-lived self
        (kills and deletes the container, unmounts the rootfs)."""
        args = ["-id", bundle.id, "-bundle", str(bundle.path), "delete"]
        cwd = bundle.path if bundle.path.is_dir() else Path("/")
        proc = await asyncio.create_subprocess_exec(
            *self._argv(bundle, *args), cwd=cwd, env=self.env(bundle),
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE, process_group=0)
        try:
            out, err = await asyncio.wait_for(proc.communicate(), timeout)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise FailedPrecondition(f"shim {self.binary} delete: no answer in {timeout}s") from None
        if proc.returncode != 0:
            raise FailedPrecondition(
                f"{err.decode(errors='replace').strip()}: exit status {proc.returncode}")
        if err.strip():
            log.warning("shim cleanup warnings", id=bundle.id, namespace=bundle.namespace,
                        output=err.decode(errors="replace").strip())
        return shim_pb2.DeleteResponse.FromString(out)
