"""The OCI distribution API for one repository: resolve, fetch and push.

Every method tries the repository's endpoints in order (mirrors first, then the
upstream), skipping those without the needed capability. Downloads resume with
``Range`` after a dropped connection and never hand on more bytes than the descriptor
announces; manifests are size-limited and digest-checked before anyone parses them.
"""
from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from urllib.parse import quote, urlencode, urljoin

import structlog

from ctrd.errors import (
    CtrdError,
    DataLoss,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unavailable,
)
from ctrd.lazyimport import lazy_module
from ctrd.oci import digest as digests
from ctrd.oci import mediatypes
from ctrd.oci.descriptor import Descriptor
from ctrd.reference import Reference

from .auth import repository_scope
from .hosts import PULL, PUSH, RESOLVE, RegistryHost
from .transport import Request, Transport, backoff_delay, transport_error

httpx = lazy_module("httpx")  # only pulls and pushes need it

log = structlog.get_logger()

MANIFEST_ACCEPT = ", ".join([
    mediatypes.DOCKER_MANIFEST, mediatypes.DOCKER_MANIFEST_LIST,
    mediatypes.OCI_MANIFEST, mediatypes.OCI_INDEX, "*/*",
])
READ_CHUNK = 1 << 20
# Blobs up to this size go up in one PUT; larger ones are streamed with PATCH first.
MONOLITHIC_LIMIT = 4 << 20

ChunkSink = Callable[[bytes], Awaitable[None]]
ChunkSource = Callable[[], AsyncIterator[bytes]]


@dataclass(frozen=True)
class PushResult:
    digest: str
    # "exists": the registry had it; "mounted": cross-repository mount; "uploaded".
    how: str


class Repository:
    """One repository (``library/busybox``) on one registry (``docker.io``)."""

    def __init__(self, transport: Transport, hosts: list[RegistryHost], ref: Reference) -> None:
        self.transport = transport
        self.hosts = hosts
        self.ref = ref
        self.options = transport.options

    # ---- plumbing

    def _hosts(self, *capabilities: str) -> list[RegistryHost]:
        found = [h for h in self.hosts if all(h.can(c) for c in capabilities)]
        if not found:
            raise NotFound(f"no {'/'.join(capabilities)} hosts for {self.ref.domain}")
        return found

    def _url(self, host: RegistryHost, *parts: str, query: dict[str, str] | None = None) -> str:
        url = f"{host.base_url}/{self.ref.path}/" + "/".join(quote(p, safe=":") for p in parts)
        params = dict(query or {})
        # A mirror learns which upstream registry is meant from ?ns= (containerd's convention).
        if host.host != self.ref.domain:
            params["ns"] = self.ref.domain
        return url + ("?" + urlencode(params) if params else "")

    def _scopes(self, push: bool = False, extra: tuple[str, ...] = ()) -> tuple[str, ...]:
        return (repository_scope(self.ref.path, push),) + extra

    # ---- resolve and manifests

    async def resolve(self, ref: Reference | None = None) -> Descriptor:
        """The descriptor a tag or digest currently names (HEAD, or GET if HEAD says too little)."""
        ref = ref or self.ref
        if ref.digest:
            digests.validate(ref.digest)
            attempts = [("manifests", ref.digest), ("blobs", ref.digest)]
            hosts = self._hosts(PULL)
        else:
            if not ref.tag:
                raise InvalidArgument(f"reference {ref}: object required")
            attempts = [("manifests", ref.tag)]
            hosts = self._hosts(PULL, RESOLVE)
        first_error: CtrdError | None = None
        for kind, obj in attempts:
            for host in hosts:
                try:
                    return await self._resolve_at(host, kind, obj, ref.digest)
                except NotFound:
                    continue
                except CtrdError as exc:
                    if isinstance(exc, ResourceExhausted | DataLoss):
                        raise
                    log.info("resolve failed; trying next host", host=host.host, error=str(exc))
                    first_error = first_error or exc
        raise first_error or NotFound(f"{ref}: not found")

    async def _resolve_at(self, host: RegistryHost, kind: str, obj: str,
                          expected: str) -> Descriptor:
        headers = {"accept": MANIFEST_ACCEPT}
        req = Request("HEAD", self._url(host, kind, obj), host, self._scopes(), headers)
        response = await self.transport.send(req, stream=False)
        media_type = _media_type(response)
        dgst = expected or response.headers.get("docker-content-digest", "")
        size = _content_length(response)
        if dgst and size is not None:
            digests.validate(dgst)
        else:
            # Some registries leave the digest out of HEAD answers: read the manifest.
            req = Request("GET", self._url(host, kind, obj), host, self._scopes(), headers)
            data, response = await self._read_limited(req)
            media_type = _media_type(response)
            computed = str(digests.of_bytes(data))
            if expected and computed != expected:
                raise DataLoss(f"{self.ref}: manifest digest {computed}, expected {expected}")
            dgst, size = computed, len(data)
        if size > self.options.max_manifest_size:
            raise ResourceExhausted(
                f"{self.ref}: rejecting {size} byte manifest "
                f"(limit {self.options.max_manifest_size})")
        return Descriptor(media_type=media_type, digest=dgst, size=size)

    async def _read_limited(self, req: Request) -> tuple[bytes, httpx.Response]:
        limit = self.options.max_manifest_size
        response = await self.transport.send(req)
        try:
            length = _content_length(response)
            if length is not None and length > limit:
                raise ResourceExhausted(
                    f"{req.url}: manifest of {length} bytes exceeds the {limit} byte limit")
            body = bytearray()
            try:
                async for chunk in response.aiter_raw():
                    body += chunk
                    if len(body) > limit:
                        raise ResourceExhausted(
                            f"{req.url}: manifest exceeds the {limit} byte limit")
            except httpx.TransportError as exc:
                raise transport_error(req, exc) from exc
            return bytes(body), response
        finally:
            await response.aclose()

    async def fetch_manifest(self, desc: Descriptor) -> bytes:
        """A manifest or index by digest, checked against ``desc`` before it is returned."""
        if desc.size > self.options.max_manifest_size:
            raise ResourceExhausted(
                f"{desc.digest}: manifest of {desc.size} bytes exceeds the "
                f"{self.options.max_manifest_size} byte limit")
        first_error: CtrdError | None = None
        for host in self._hosts(PULL):
            for kind in ("manifests", "blobs"):
                req = Request("GET", self._url(host, kind, desc.digest), host, self._scopes(),
                              {"accept": MANIFEST_ACCEPT})
                try:
                    data, _ = await self._read_limited(req)
                except NotFound as exc:
                    first_error = first_error or exc
                    continue
                except (Unavailable, FailedPrecondition) as exc:
                    first_error = first_error or exc
                    break
                _verify(desc, data)
                return data
        raise first_error or NotFound(f"{desc.digest}: not found")

    # ---- blobs

    async def fetch_blob(self, desc: Descriptor, sink: ChunkSink, *, offset: int = 0) -> None:
        """Stream blob ``desc`` from byte ``offset`` into ``sink``.

        Dropped connections and short bodies resume with a Range request; a body longer
        than ``desc.size`` is refused before the excess reaches ``sink``. When starting
        at 0 the digest is checked too (DataLoss on mismatch); callers that resume an
        older partial write must verify on commit, as the content store does.
        """
        hasher = hashlib.new(desc.digest.split(":", 1)[0]) if offset == 0 else None
        received = offset
        failures = 0
        hosts = self._hosts(PULL)
        host_index = 0
        last_error: CtrdError | None = None
        while True:
            host = hosts[host_index]
            headers = {"accept-encoding": "identity"}
            if received:
                headers["range"] = f"bytes={received}-"
            req = Request("GET", self._url(host, "blobs", desc.digest), host, self._scopes(),
                          headers)
            try:
                response = await self.transport.send(req, ok=(200, 206))
            except NotFound as exc:
                # Maybe a mirror lacks it: the next endpoint may have it.
                last_error = exc
                host_index += 1
                if host_index >= len(hosts):
                    raise
                continue
            try:
                skip = _range_skip(response, received, desc)
                async for chunk in response.aiter_raw(READ_CHUNK):
                    if skip:
                        cut = min(skip, len(chunk))
                        chunk, skip = chunk[cut:], skip - cut
                        if not chunk:
                            continue
                    if received + len(chunk) > desc.size:
                        raise DataLoss(
                            f"{desc.digest}: registry sent more than the {desc.size} bytes "
                            "the descriptor announces")
                    if hasher is not None:
                        hasher.update(chunk)
                    await sink(chunk)
                    received += len(chunk)
            except httpx.TransportError as exc:
                last_error = transport_error(req, exc)
            finally:
                await response.aclose()
            if received >= desc.size:
                break
            failures += 1
            if failures >= self.options.attempts:
                raise last_error or Unavailable(
                    f"{desc.digest}: download ended at {received} of {desc.size} bytes")
            log.info("blob download interrupted; resuming", digest=desc.digest,
                     received=received, size=desc.size, attempt=failures)
            await asyncio.sleep(backoff_delay(self.options, failures - 1))
        if hasher is not None:
            got = f"{desc.digest.split(':', 1)[0]}:{hasher.hexdigest()}"
            if got != desc.digest:
                raise DataLoss(f"{desc.digest}: downloaded content has digest {got}")

    async def blob_exists(self, desc: Descriptor, host: RegistryHost | None = None) -> bool:
        host = host or self._hosts(PUSH)[-1]
        req = Request("HEAD", self._url(host, "blobs", desc.digest), host, self._scopes(True))
        try:
            response = await self.transport.send(req, stream=False)
        except NotFound:
            return False
        length = _content_length(response)
        return length is None or length == desc.size

    async def push_blob(self, desc: Descriptor, source: ChunkSource, *,
                        mount_from: tuple[str, ...] = ()) -> PushResult:
        """Upload a blob unless the registry has it; try cross-repository mounts first."""
        host = self._hosts(PUSH)[-1]
        if await self.blob_exists(desc, host):
            return PushResult(desc.digest, "exists")
        for repo in mount_from:
            if repo == self.ref.path:
                continue
            extra = (repository_scope(repo),)
            req = Request("POST", self._url(host, "blobs", "uploads", "",
                                            query={"mount": desc.digest, "from": repo}),
                          host, self._scopes(True, extra))
            response = await self.transport.send(req, ok=(201, 202), stream=False)
            if response.status_code == 201:
                return PushResult(desc.digest, "mounted")
            # 202: the mount was refused and an upload session opened instead; use it.
            return await self._upload(host, desc, source, response, extra)
        req = Request("POST", self._url(host, "blobs", "uploads", ""), host, self._scopes(True))
        response = await self.transport.send(req, ok=(202,), stream=False)
        return await self._upload(host, desc, source, response)

    async def _upload(self, host: RegistryHost, desc: Descriptor, source: ChunkSource,
                      started: httpx.Response, extra: tuple[str, ...] = ()) -> PushResult:
        location = _location(started)
        scopes = self._scopes(True, extra)
        if desc.size > MONOLITHIC_LIMIT:
            # Stream the bytes in one PATCH; the final PUT then only names the digest.
            req = Request("PATCH", location, host, scopes,
                          {"content-type": "application/octet-stream"}, body=source)
            response = await self.transport.send(req, ok=(202,), stream=False)
            location = _location(response)
            body: Callable[[], bytes | AsyncIterator[bytes]] = lambda: b""
            length = 0
        else:
            body, length = source, desc.size
        sep = "&" if "?" in location else "?"
        req = Request("PUT", f"{location}{sep}{urlencode({'digest': desc.digest})}", host, scopes,
                      {"content-type": "application/octet-stream",
                       "content-length": str(length)}, body=body)
        response = await self.transport.send(req, ok=(201, 204), stream=False)
        got = response.headers.get("docker-content-digest")
        if got and got != desc.digest:
            raise DataLoss(f"registry stored {got} for pushed blob {desc.digest}")
        return PushResult(desc.digest, "uploaded")

    async def push_manifest(self, desc: Descriptor, data: bytes, tag: str = "") -> None:
        """PUT a manifest or index under ``tag`` (or its digest when no tag is given)."""
        _verify(desc, data)
        host = self._hosts(PUSH)[-1]
        req = Request("PUT", self._url(host, "manifests", tag or desc.digest), host,
                      self._scopes(True), {"content-type": desc.media_type}, body=lambda: data)
        response = await self.transport.send(req, ok=(200, 201, 202, 204), stream=False)
        got = response.headers.get("docker-content-digest")
        if got and got != desc.digest:
            raise DataLoss(f"registry stored {got} for pushed manifest {desc.digest}")


def _verify(desc: Descriptor, data: bytes) -> None:
    if desc.size and len(data) != desc.size:
        raise DataLoss(f"{desc.digest}: got {len(data)} bytes, descriptor says {desc.size}")
    algorithm = desc.digest.split(":", 1)[0]
    got = f"{algorithm}:{hashlib.new(algorithm, data).hexdigest()}"
    if got != desc.digest:
        raise DataLoss(f"{desc.digest}: content has digest {got}")


def _media_type(response: httpx.Response) -> str:
    return mediatypes.base(response.headers.get("content-type", "")) or ""


def _content_length(response: httpx.Response) -> int | None:
    value = response.headers.get("content-length")
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def _location(response: httpx.Response) -> str:
    location = response.headers.get("location")
    if not location:
        raise FailedPrecondition(f"{response.request.url}: upload answer without Location")
    # Relative locations are relative to the request that produced them.
    return urljoin(str(response.request.url), location)


def _range_skip(response: httpx.Response, offset: int, desc: Descriptor) -> int:
    """How many leading bytes of ``response`` to drop to continue at ``offset``."""
    if offset == 0:
        return 0
    if response.status_code == 200:
        return offset  # the server ignored Range: skip what we already have
    content_range = response.headers.get("content-range", "")
    # "bytes START-END/TOTAL"
    try:
        start = int(content_range.split(" ", 1)[1].split("-", 1)[0])
    except (IndexError, ValueError):
        raise DataLoss(f"{desc.digest}: bad Content-Range {content_range!r}") from None
    if start != offset:
        raise DataLoss(f"{desc.digest}: asked for bytes from {offset}, got from {start}")
    return 0
