"""Our ttrpc client against a Go ttrpc peer: containerd's own containerd-shim-runc-v2.

The shim is started the way containerd starts it (``start`` action in a bundle
directory, TTRPC_ADDRESS in the environment); our asyncio events server listens at
that address, our clients call the shim's Task service, then shut it down.
"""
from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ctrd import errors
from ctrd.api.containerd.runtime.task.v2 import shim_pb2
from ctrd.ttrpc import aio, blocking
from ctrd.ttrpc.addr import socket_path
from ctrd.ttrpc.codec import ClosedError

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(shutil.which("containerd-shim-runc-v2") is None,
                       reason="containerd-shim-runc-v2 not installed"),
]
SERVICE = "containerd.task.v2.Task"
MD = {"containerd-namespace": "ttrpc-interop"}


@pytest.fixture
def go_shim() -> Iterator[tuple[str, Path]]:
    with tempfile.TemporaryDirectory(prefix="ttrpc-interop-") as tmp:
        root = Path(tmp)
        bundle = root / "bundle"
        bundle.mkdir()
        (bundle / "config.json").write_text(json.dumps({"ociVersion": "1.0.2"}))
        os.mkfifo(bundle / "log")
        # The shim opens its log fifo for writing; hold the read end like containerd does.
        log_fd = os.open(bundle / "log", os.O_RDONLY | os.O_NONBLOCK)
        env = dict(os.environ, TTRPC_ADDRESS=str(root / "events.ttrpc"))
        out = subprocess.run(
            ["containerd-shim-runc-v2", "-namespace", MD["containerd-namespace"],
             "-id", "interop", "-address", str(root / "grpc.sock"), "start"],
            cwd=bundle, env=env, capture_output=True, timeout=30, check=True,
        )
        address = out.stdout.decode().strip()
        assert address.startswith("unix://")
        assert (bundle / "address").read_text() == address
        try:
            yield address, root
        finally:
            try:
                with blocking.Client.connect(address, timeout=2) as client:
                    client.call_raw(SERVICE, "Shutdown", shim_pb2.ShutdownRequest(
                        id="interop").SerializeToString(), timeout=5, metadata=MD)
            except (errors.CtrdError, OSError):
                pass
            os.close(log_fd)
            path = socket_path(address)
            if os.path.exists(path):
                os.unlink(path)


def test_blocking_client_against_go_shim(go_shim: tuple[str, Path]) -> None:
    address, _ = go_shim
    with blocking.Client.connect(address) as client:
        resp = client.call(SERVICE, "Connect", shim_pb2.ConnectRequest(id="interop"),
                           shim_pb2.ConnectResponse, timeout=5, metadata=MD)
        assert resp.shim_pid > 0 and resp.task_pid == 0
        with pytest.raises(errors.NotFound, match="container not created"):
            client.call(SERVICE, "State", shim_pb2.StateRequest(id="interop"),
                        shim_pb2.StateResponse, timeout=5, metadata=MD)
        pid = resp.shim_pid
        try:
            client.call_raw(SERVICE, "Shutdown", shim_pb2.ShutdownRequest(id="interop")
                            .SerializeToString(), timeout=5, metadata=MD)
        except ClosedError:
            pass  # the Go shim may exit before its answer is written; containerd allows it
    for _ in range(100):  # the shim exits after Shutdown
        if not os.path.exists(f"/proc/{pid}") or _is_zombie(pid):
            break
        time.sleep(0.05)
    else:
        pytest.fail("Go shim did not exit after Shutdown")


async def test_aio_client_and_events_server_with_go_shim(go_shim: tuple[str, Path]) -> None:
    address, root = go_shim
    server = aio.Server()
    server.register("containerd.services.events.ttrpc.v1.Events",
                    {"Forward": lambda ctx, payload: b""})
    await server.listen(str(root / "events.ttrpc"))
    client = await aio.Client.connect(address)
    try:
        calls = [client.call(SERVICE, "Connect", shim_pb2.ConnectRequest(id="interop"),
                             shim_pb2.ConnectResponse, timeout=5, metadata=MD) for _ in range(8)]
        pids = {r.shim_pid for r in await asyncio.gather(*calls)}
        assert len(pids) == 1
        with pytest.raises(errors.NotFound):
            await client.call(SERVICE, "Pids", shim_pb2.PidsRequest(id="interop"),
                              shim_pb2.PidsResponse, timeout=5, metadata=MD)
    finally:
        await client.close()
        await server.close()


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[1].split()[0] == "Z"
    except OSError:
        return True
