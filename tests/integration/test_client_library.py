"""ctrd.client's library API against ctrd and the reference containerd alike."""
from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from ctrd import errors
from ctrd.client import AsyncClient, Client, runner
from ctrd.client.spec import SpecOptions
from ctrd.oci import busybox, writer
from helpers.containerd_ref import containerd_ref  # noqa: F401  (fixture)

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(params=["ctrd", "containerd"])
def address(request) -> Iterator[str]:
    daemon = request.getfixturevalue("ctrd" if request.param == "ctrd" else "containerd_ref")
    yield daemon.address


def test_content_and_leases(address: str) -> None:
    data = os.urandom(3 << 20)  # several write chunks
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    with Client(address) as client:
        assert client.content.write("lib-test", data, expected=digest, total=len(data),
                                    labels={"containerd.io/gc.root": "test"}) == digest
        info = client.content.info(digest)
        assert info.size == len(data) and info.labels["containerd.io/gc.root"] == "test"
        assert client.content.read(digest) == data
        # Writing it again is not an error, and updates labels.
        assert client.content.write("lib-test-2", data, expected=digest,
                                    labels={"a": "b"}) == digest
        assert client.content.info(digest).labels["a"] == "b"
        with pytest.raises(errors.FailedPrecondition):
            client.content.write("lib-bad", b"abc", expected="sha256:" + "0" * 64, total=3)
        client.content.delete(digest)
        with pytest.raises(errors.NotFound):
            client.content.info(digest)

        lease = client.leases.create(labels={"purpose": "test"}, expire_seconds=60)
        assert lease.id in [item.id for item in client.leases.list()]
        client.leases.delete(lease.id)
        assert lease.id not in [item.id for item in client.leases.list()]


async def test_container_workflow(address: str) -> None:
    with tempfile.TemporaryDirectory(dir="/tmp") as tmp:
        archive = Path(tmp) / "img.tar"
        writer.write_oci_archive(archive, {"example.com/lib/bb:v1": busybox.busybox_image()})
        async with AsyncClient(address, namespace="libtest") as client:
            result = await client.import_archive(str(archive))
            assert [i.name for i in result.images] == ["example.com/lib/bb:v1"]
            options = runner.RunOptions(
                "example.com/lib/bb:v1", ["sh", "-c", "echo ready; sleep 100"], id="lib1",
                detach=True, log_dir=str(Path(tmp) / "logs"),
                spec=SpecOptions(env=["X=1"]))
            container = await runner.create(client, options)
            try:
                assert container.spec["process"]["env"][-1] == "X=1"
                assert container.snapshot_key == "lib1"
                pid = await runner.start_detached(client, container)
                assert pid > 0
                assert (await client.tasks.get("lib1")).status == "running"
                exit = await runner.stop(client, "lib1", timeout=1)
                assert exit is not None and exit.status == 137
                log = container.labels[runner.LABEL_LOG]
                assert Path(log).read_text() == "ready\n"
                labelled = await client.containers.get("lib1")
                assert labelled.labels[runner.LABEL_EXIT] == "137"
            finally:
                await runner.remove(client, "lib1", force=True)
            with pytest.raises(errors.NotFound):
                await client.containers.get("lib1")
            with pytest.raises(errors.NotFound):
                await client.snapshots.stat("lib1")
            await client.images.delete("example.com/lib/bb:v1")
