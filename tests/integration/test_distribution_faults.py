"""Hostile and flaky registries: a fault-injecting proxy between the client and a real registry.

Every case ends either in a clear error or in a correct pull; content that failed
verification is never committed (nor left behind as a resumable ingest).
"""
from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from ctrd import reference
from ctrd.daemon.remotes import platforms
from ctrd.daemon.remotes.hosts import HostsConfig
from ctrd.daemon.remotes.resolver import Resolver
from ctrd.daemon.remotes.transport import ClientOptions, HTTPPool
from ctrd.daemon.transfer.progress import Tracker
from ctrd.daemon.transfer.pull import Puller, PullOptions, Stores
from ctrd.errors import (
    DataLoss,
    DeadlineExceeded,
    FailedPrecondition,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
)
from ctrd.oci import busybox, writer
from helpers.faultproxy import Fault, FaultProxy
from helpers.registry import Registry, start_registry

pytestmark = [pytest.mark.integration, pytest.mark.skipif(
    shutil.which("docker-registry") is None or shutil.which("skopeo") is None,
    reason="needs docker-registry and skopeo")]

NS = "default"
FAST = ClientOptions(connect_timeout=2.0, read_timeout=1.0, attempts=4, backoff=0.01,
                     max_backoff=0.05)


@pytest.fixture(scope="module")
def env() -> Iterator[tuple[Registry, writer.Image]]:
    workdir = Path(tempfile.mkdtemp(prefix="ctrd-faults-", dir="/var/tmp"))
    registry = start_registry(workdir / "registry")
    try:
        # Random bytes: the layer stays big after compression, so cuts land inside it.
        image = busybox.busybox_image(extra_layers=[[writer.file("big", os.urandom(3 << 20))]])
        registry.push_image(image, "faults/busybox:v1", workdir)
        yield registry, image
    finally:
        registry.stop()
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture
def proxy(env) -> Iterator[FaultProxy]:
    registry, _ = env
    proxy = FaultProxy(registry.port)
    try:
        yield proxy
    finally:
        proxy.close()


@pytest.fixture
async def pool() -> AsyncIterator[HTTPPool]:
    pool = HTTPPool(FAST)
    try:
        yield pool
    finally:
        await pool.aclose()


async def pull(stores: Stores, pool: HTTPPool, proxy: FaultProxy) -> list:
    ref = reference.normalize(f"{proxy.host}/faults/busybox:v1")
    repo = Resolver(pool, HostsConfig(config_dir=None)).repository(ref)
    options = PullOptions(platforms=platforms.Matcher.of([platforms.host()]))
    return await Puller(stores, NS, repo, options, Tracker(None, str(ref))).run()


def big_layer(image: writer.Image) -> writer.Layer:
    return max(image.layers, key=lambda layer: layer.blob.size)


async def assert_pulled(stores: Stores, image: writer.Image, images: list) -> None:
    assert images[0].target.digest == image.digest
    have = {i.digest for i in await stores.content.list(NS)}
    assert {b.digest for b in image.blobs} <= have


async def test_wrong_digest_is_never_committed(env, proxy: FaultProxy, stores: Stores,
                                               pool: HTTPPool) -> None:
    _, image = env
    layer = big_layer(image)
    proxy.add(Fault("corrupt", path=f"/blobs/{layer.blob.digest}", times=None))
    with pytest.raises(DataLoss, match=layer.blob.digest):
        await pull(stores, pool, proxy)
    have = {i.digest for i in await stores.content.list(NS)}
    assert layer.blob.digest not in have
    # Downloads cancelled by the failure (the config, if it was still in flight) may stay
    # as resumable ingests, as in containerd; the corrupt layer's bytes must not.
    refs = [status.ref for status in await stores.content.list_statuses(NS)]
    assert not [ref for ref in refs if layer.blob.digest in ref]


async def test_truncated_blob_resumes_with_range(env, proxy: FaultProxy, stores: Stores,
                                                 pool: HTTPPool) -> None:
    _, image = env
    layer = big_layer(image)
    proxy.add(Fault("truncate", path=f"/blobs/{layer.blob.digest}", times=2, after=1 << 20))
    # 3 MiB: cut at 1 MiB, resumed and cut again 1 MiB later, then resumed to the end.
    images = await pull(stores, pool, proxy)
    await assert_pulled(stores, image, images)
    gets = [entry for entry in proxy.log if layer.blob.digest in entry[1] and entry[0] == "GET"]
    assert [status for _, _, status in gets] == [200, 206, 206]


async def test_truncated_forever_fails(env, proxy: FaultProxy, stores: Stores,
                                       pool: HTTPPool) -> None:
    _, image = env
    layer = big_layer(image)
    proxy.add(Fault("truncate", path=f"/blobs/{layer.blob.digest}", times=None, after=1000))
    with pytest.raises(Unavailable):
        await pull(stores, pool, proxy)
    assert layer.blob.digest not in {i.digest for i in await stores.content.list(NS)}


async def test_connection_reset_mid_layer_resumes(env, proxy: FaultProxy, stores: Stores,
                                                  pool: HTTPPool) -> None:
    _, image = env
    layer = big_layer(image)
    proxy.add(Fault("reset", path=f"/blobs/{layer.blob.digest}", times=1, after=2 << 20))
    images = await pull(stores, pool, proxy)
    await assert_pulled(stores, image, images)


async def test_server_ignoring_range_still_resumes(env, proxy: FaultProxy, stores: Stores,
                                                   pool: HTTPPool) -> None:
    _, image = env
    layer = big_layer(image)
    proxy.add(Fault("truncate", path=f"/blobs/{layer.blob.digest}", times=1, after=1 << 20))
    proxy.add(Fault("ignore_range", path=f"/blobs/{layer.blob.digest}", times=1))
    images = await pull(stores, pool, proxy)
    await assert_pulled(stores, image, images)


async def test_5xx_then_success(env, proxy: FaultProxy, stores: Stores, pool: HTTPPool) -> None:
    _, image = env
    proxy.add(Fault("status", method="HEAD", path="/manifests/", status=503, times=2))
    proxy.add(Fault("status", path="/blobs/", status=502, times=2))
    images = await pull(stores, pool, proxy)
    await assert_pulled(stores, image, images)


async def test_5xx_forever_fails(env, proxy: FaultProxy, stores: Stores, pool: HTTPPool) -> None:
    proxy.add(Fault("status", method="*", status=500, times=None))
    with pytest.raises(Unavailable, match="500"):
        await pull(stores, pool, proxy)
    # Bounded: the client gave up after FAST.attempts tries.
    assert len(proxy.log) == FAST.attempts


async def test_401_forever(env, proxy: FaultProxy, stores: Stores, pool: HTTPPool) -> None:
    proxy.add(Fault("status", method="*", status=401, times=None,
                    headers={"www-authenticate": 'Basic realm="nope"'}))
    with pytest.raises(Unauthenticated):
        await pull(stores, pool, proxy)
    assert len(proxy.log) <= 3


async def test_redirect_loop(env, proxy: FaultProxy, stores: Stores, pool: HTTPPool) -> None:
    _, image = env
    proxy.add(Fault("redirect_loop", path=f"/blobs/{big_layer(image).blob.digest}", times=None))
    with pytest.raises(FailedPrecondition, match="redirect"):
        await pull(stores, pool, proxy)


async def test_oversized_manifest(env, proxy: FaultProxy, stores: Stores,
                                  pool: HTTPPool) -> None:
    _, image = env
    proxy.add(Fault("big_manifest", path=f"/manifests/{image.digest}", times=None))
    with pytest.raises(ResourceExhausted, match="limit"):
        await pull(stores, pool, proxy)
    assert await stores.content.list(NS) == []


async def test_slow_server_times_out(env, proxy: FaultProxy, stores: Stores,
                                     pool: HTTPPool) -> None:
    proxy.add(Fault("stall", method="*", delay=FAST.read_timeout * 2, times=None))
    started = time.monotonic()
    with pytest.raises(DeadlineExceeded):
        await pull(stores, pool, proxy)
    # Bounded by attempts x read timeout (plus backoff), not by the server.
    assert time.monotonic() - started < FAST.attempts * (FAST.read_timeout + 1) + 2


async def test_slow_once_then_fine(env, proxy: FaultProxy, stores: Stores,
                                   pool: HTTPPool) -> None:
    _, image = env
    proxy.add(Fault("stall", path=f"/blobs/{big_layer(image).blob.digest}",
                    delay=FAST.read_timeout * 2, times=1))
    images = await pull(stores, pool, proxy)
    await assert_pulled(stores, image, images)
