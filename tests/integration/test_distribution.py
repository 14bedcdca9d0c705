"""Pull and push against Debian's real docker-registry, in-process (no daemon).

Covers plain HTTP, TLS with a test CA (via certs.d/hosts.toml), client certificates,
htpasswd Basic auth from a Docker config.json, token auth, single- and
multi-platform images, gzip/zstd/uncompressed layers, Docker and OCI media types,
push and pull-back with identical digests.
"""
from __future__ import annotations

import base64
import json
import shutil
import subprocess
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from ctrd import reference
from ctrd.daemon.remotes import platforms
from ctrd.daemon.remotes.auth import file_credentials
from ctrd.daemon.remotes.hosts import HostsConfig
from ctrd.daemon.remotes.resolver import Resolver
from ctrd.daemon.remotes.transport import HTTPPool
from ctrd.daemon.transfer.progress import Progress, Tracker
from ctrd.daemon.transfer.pull import Puller, PullOptions, Stores
from ctrd.daemon.transfer.push import Pusher, PushOptions
from ctrd.errors import Unauthenticated
from ctrd.oci import busybox, writer
from ctrd.oci.writer import Compression, Platform
from helpers.stores import temporary_stores
from helpers.registry import Registry, TestCA, TokenServer, start_registry

pytestmark = [pytest.mark.integration, pytest.mark.skipif(
    shutil.which("docker-registry") is None or shutil.which("skopeo") is None,
    reason="needs docker-registry and skopeo")]

NS = "default"


@pytest.fixture(scope="module")
def workdir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="ctrd-dist-", dir="/var/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def plain_registry(workdir: Path) -> Iterator[Registry]:
    registry = start_registry(workdir / "plain")
    try:
        yield registry
    finally:
        registry.stop()


@pytest.fixture
async def pool() -> AsyncIterator[HTTPPool]:
    pool = HTTPPool()
    try:
        yield pool
    finally:
        await pool.aclose()


def resolver(pool: HTTPPool, certs_dir: Path | None = None, credentials=None,
             scheme: str = "") -> Resolver:
    hosts = HostsConfig(config_dir=str(certs_dir) if certs_dir else None, default_scheme=scheme)
    return Resolver(pool, hosts, credentials=credentials)


async def pull(stores: Stores, res: Resolver, ref: str, *,
               platforms_: list[Platform] | None = None,
               events: list[Progress] | None = None) -> list:
    parsed = reference.normalize(ref)
    wanted = [platforms.host()] if platforms_ is None else platforms_
    options = PullOptions(platforms=platforms.Matcher.of(wanted))
    tracker = Tracker(events.append if events is not None else None, str(parsed))
    return await Puller(stores, NS, res.repository(parsed), options, tracker).run()


async def content_digests(stores: Stores) -> set[str]:
    return {info.digest for info in await stores.content.list(NS)}


def expected_blobs(image: writer.Image) -> set[str]:
    return {b.digest for b in image.blobs}


# ---------------------------------------------------------------------------


async def test_pull_single_platform(plain_registry: Registry, workdir: Path, stores: Stores,
                                    pool: HTTPPool) -> None:
    image = busybox.busybox_image(extra_layers=[[writer.file("etc/x", "1")]])
    plain_registry.push_image(image, "single/busybox:v1", workdir)
    events: list[Progress] = []
    images = await pull(stores, resolver(pool), f"{plain_registry.host}/single/busybox:v1",
                        events=events)
    assert [i.name for i in images] == [f"{plain_registry.host}/single/busybox:v1"]
    assert images[0].target.digest == image.digest
    assert expected_blobs(image) <= await content_digests(stores)
    # GC labels tie the manifest to its children; the source label names the repository.
    info = await stores.content.info(NS, image.digest)
    assert info.labels["containerd.io/gc.ref.content.config"] == image.config.digest
    assert info.labels["containerd.io/gc.ref.content.l.1"] == image.layers[1].blob.digest
    assert info.labels[f"containerd.io/distribution.source.{plain_registry.host}"] == \
        "single/busybox"
    kinds = {e.event for e in events}
    assert {"waiting", "complete", "saved"} <= kinds
    assert any(e.event.startswith("Completed pull") for e in events)
    # A second pull finds everything present.
    events.clear()
    await pull(stores, resolver(pool), f"{plain_registry.host}/single/busybox:v1", events=events)
    assert any(e.event == "already exists" for e in events)


@pytest.mark.parametrize("compression,docker", [
    (Compression.ZSTD, False), (Compression.NONE, False), (Compression.GZIP, True),
    (Compression.NONE, True)])
async def test_pull_layer_kinds(plain_registry: Registry, workdir: Path, stores: Stores,
                                pool: HTTPPool, compression: Compression, docker: bool) -> None:
    image = busybox.busybox_image(compression=compression, docker=docker)
    tag = f"kinds/{compression.name.lower()}-{'docker' if docker else 'oci'}:v1"
    plain_registry.push_image(image, tag, workdir)
    images = await pull(stores, resolver(pool), f"{plain_registry.host}/{tag}")
    assert images[0].target.digest == image.digest
    assert expected_blobs(image) <= await content_digests(stores)


@pytest.mark.parametrize("docker", [False, True])
async def test_pull_multi_platform(plain_registry: Registry, workdir: Path, stores: Stores,
                                   pool: HTTPPool, docker: bool) -> None:
    other = Platform("linux", "arm64", "v8")
    index = busybox.multi_platform_image([Platform.host(), other], docker=docker)
    tag = f"multi/busybox:{'docker' if docker else 'oci'}"
    plain_registry.push_image(index, tag, workdir)
    host_image_blobs = {index.root.digest}
    manifests = json.loads(index.root.data)["manifests"]
    host_entry = next(m for m in manifests if m["platform"]["architecture"] == "amd64")
    arm_entry = next(m for m in manifests if m["platform"]["architecture"] == "arm64")
    host_image_blobs.add(host_entry["digest"])

    # Default: the host's platform only.
    images = await pull(stores, resolver(pool), f"{plain_registry.host}/{tag}")
    assert images[0].target.digest == index.digest
    have = await content_digests(stores)
    assert host_image_blobs <= have
    assert arm_entry["digest"] not in have
    info = await stores.content.info(NS, index.digest)
    assert list(v for k, v in info.labels.items() if ".m." in k) == [host_entry["digest"]]

    # An explicit platform.
    await pull(stores, resolver(pool), f"{plain_registry.host}/{tag}",
               platforms_=[platforms.parse("linux/arm64")])
    assert arm_entry["digest"] in await content_digests(stores)

    # All platforms: every blob of the index.
    await pull(stores, resolver(pool), f"{plain_registry.host}/{tag}", platforms_=[])
    assert expected_blobs(index) <= await content_digests(stores)


async def test_pull_unknown_platform_fails(plain_registry: Registry, workdir: Path,
                                           stores: Stores, pool: HTTPPool) -> None:
    index = busybox.multi_platform_image([Platform.host()])
    plain_registry.push_image(index, "multi/only-host:v1", workdir)
    with pytest.raises(Exception, match="no image for platform"):
        await pull(stores, resolver(pool), f"{plain_registry.host}/multi/only-host:v1",
                   platforms_=[platforms.parse("linux/s390x")])


async def test_pull_by_digest(plain_registry: Registry, workdir: Path, stores: Stores,
                              pool: HTTPPool) -> None:
    image = busybox.busybox_image(extra_layers=[[writer.file("digest", "x")]])
    plain_registry.push_image(image, "bydigest/busybox:v1", workdir)
    ref = f"{plain_registry.host}/bydigest/busybox@{image.digest}"
    images = await pull(stores, resolver(pool), ref)
    assert images[0].name == ref
    assert images[0].target.digest == image.digest


async def push(stores: Stores, res: Resolver, name: str, ref: str,
               events: list[Progress] | None = None) -> None:
    image = await stores.images.get(NS, name)
    parsed = reference.normalize(ref)
    tracker = Tracker(events.append if events is not None else None, str(parsed), "uploading")
    await Pusher(stores, NS, res.repository(parsed), PushOptions(), tracker).run(image)


async def test_push_and_pull_back(plain_registry: Registry, workdir: Path, stores: Stores,
                                  pool: HTTPPool, tmp_path: Path) -> None:
    index = busybox.multi_platform_image([Platform.host(), Platform("linux", "arm64", "v8")])
    plain_registry.push_image(index, "push/source:v1", workdir)
    src = f"{plain_registry.host}/push/source:v1"
    await pull(stores, resolver(pool), src, platforms_=[])
    # Push the whole index to a new repository: blobs cross-mount, manifests go up.
    dst = f"{plain_registry.host}/push/copy:v2"
    events: list[Progress] = []
    await push(stores, resolver(pool), src, dst, events)
    assert any(e.event in ("complete", "already exists", "mounted") for e in events)
    raw = subprocess.run(["skopeo", "inspect", "--raw", "--tls-verify=false", f"docker://{dst}"],
                         check=True, capture_output=True).stdout
    assert raw == index.root.data

    # Pull the pushed image back into a fresh store: identical digests throughout.
    back = tmp_path / "back"
    back.mkdir()
    async with temporary_stores(back) as fresh:
        images = await pull(fresh, resolver(pool), dst, platforms_=[])
        assert images[0].target.digest == index.digest
        assert expected_blobs(index) <= await content_digests(fresh)

    # Pushing again uploads nothing.
    events.clear()
    await push(stores, resolver(pool), src, dst, events)
    assert not any(e.event == "complete" for e in events if e.name.startswith("layer-"))


# ---------------------------------------------------------------------------
# TLS and authentication


async def test_tls_with_hosts_toml(workdir: Path, stores: Stores, pool: HTTPPool) -> None:
    ca = TestCA(workdir / "ca")
    registry = start_registry(workdir / "tls", tls=ca, client_ca=True)
    try:
        image = busybox.busybox_image()
        # skopeo needs the client certificate too, since the registry demands one.
        certs = registry.root / "skopeo-certs"
        certs.mkdir(exist_ok=True)
        shutil.copy(ca.client_cert, certs / "client.cert")
        shutil.copy(ca.client_key, certs / "client.key")
        registry.push_image(image, "tls/busybox:v1", workdir)
        ref = f"{registry.host}/tls/busybox:v1"

        # Loopback registries default to plain HTTP (as in containerd); asked for HTTPS
        # without configuration, the test CA is unknown and verification fails clearly.
        with pytest.raises(Exception, match="(?i)certificate|ssl"):
            await pull(stores, resolver(pool, workdir / "no-certs", scheme="https"), ref)

        certs_d = workdir / "certs.d"
        host_dir = certs_d / registry.host
        host_dir.mkdir(parents=True)
        (host_dir / "hosts.toml").write_text(
            f'server = "https://{registry.host}"\n'
            f'ca = "{ca.ca_cert}"\n'
            f'client = [["{ca.client_cert}", "{ca.client_key}"]]\n')
        images = await pull(stores, resolver(pool, certs_d), ref)
        assert images[0].target.digest == image.digest
        # Go's TLS server offers HTTP/2 through ALPN, and the client takes it.
        [host] = HostsConfig(config_dir=str(certs_d)).hosts(registry.host)
        response = await pool.client(host.tls).get(f"https://{registry.host}/v2/")
        assert response.http_version == "HTTP/2"
    finally:
        registry.stop()


async def test_basic_auth_from_docker_config(workdir: Path, stores: Stores, pool: HTTPPool,
                                             tmp_path: Path) -> None:
    registry = start_registry(workdir / "basic", users={"alice": "s3cret"})
    try:
        image = busybox.busybox_image()
        registry.push_image(image, "basic/busybox:v1", workdir)
        ref = f"{registry.host}/basic/busybox:v1"
        with pytest.raises(Unauthenticated):
            await pull(stores, resolver(pool), ref)
        config = tmp_path / "config.json"
        config.write_text(json.dumps({"auths": {registry.host: {
            "auth": base64.b64encode(b"alice:wrong").decode()}}}))
        with pytest.raises(Unauthenticated):
            await pull(stores, resolver(pool, credentials=file_credentials(config)), ref)
        config.write_text(json.dumps({"auths": {f"http://{registry.host}/v2/": {
            "auth": base64.b64encode(b"alice:s3cret").decode()}}}))
        images = await pull(stores, resolver(pool, credentials=file_credentials(config)), ref)
        assert images[0].target.digest == image.digest
    finally:
        registry.stop()


async def test_token_auth(workdir: Path, stores: Stores, pool: HTTPPool, tmp_path: Path) -> None:
    tokens = TokenServer(workdir / "tokens", {"bob": "pw"}, anonymous_pull=True)
    registry = start_registry(workdir / "token", token=tokens)
    try:
        image = busybox.busybox_image()
        registry.push_image(image, "token/busybox:v1", workdir)
        ref = f"{registry.host}/token/busybox:v1"
        tokens.requests.clear()
        # Anonymous pull through the token flow; one token serves every request.
        images = await pull(stores, resolver(pool), ref)
        assert images[0].target.digest == image.digest
        assert len(tokens.requests) == 1
        assert tokens.requests[0]["query"]["scope"] == ["repository:token/busybox:pull"]

        # Push needs a user; the anonymous token lacks push and the registry says so.
        with pytest.raises(Unauthenticated):
            await push(stores, resolver(pool), ref, f"{registry.host}/token/copy:v1")
        config = tmp_path / "config.json"
        config.write_text(json.dumps({"auths": {registry.host: {
            "username": "bob", "password": "pw"}}}))
        await push(stores, resolver(pool, credentials=file_credentials(config)), ref,
                   f"{registry.host}/token/copy:v1")
        assert any(r["user"] == "bob" for r in tokens.requests)
    finally:
        registry.stop()
        tokens.close()
