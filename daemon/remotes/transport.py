"""HTTP to registries: shared connection pools, authorization, retries and redirects.

Connections are kept alive and reused across pulls (one httpx client per distinct TLS
setting); HTTP/2 is used where the server offers it through ALPN. A request is retried
with exponential backoff on network errors, timeouts, 429 and 5xx, a bounded number of
times; a 401 leads to at most two rounds of fetching new authorization, so a registry
that refuses everything ends in a clear error rather than a loop.
"""
from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field

import structlog

from ctrd.errors import (
    CtrdError,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Unauthenticated,
    Unavailable,
)
from ctrd.lazyimport import lazy_module

from .auth import Authorizer
from .hosts import RegistryHost, TLSSettings

httpx = lazy_module("httpx")  # only pulls and pushes need it

log = structlog.get_logger()

RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
AUTH_ROUNDS = 2
USER_AGENT = "ctrd/0.1"


@dataclass(frozen=True)
class ClientOptions:
    connect_timeout: float = 30.0
    # Longest silence while reading a response (not the whole transfer).
    read_timeout: float = 60.0
    # Tries per request (and per blob download, counting resumes) before giving up.
    attempts: int = 5
    backoff: float = 0.2
    max_backoff: float = 5.0
    max_redirects: int = 10
    max_manifest_size: int = 4 << 20


class HTTPPool:
    """httpx clients shared by every registry request of the daemon, one per TLS setting."""

    def __init__(self, options: ClientOptions = ClientOptions()) -> None:
        self.options = options
        self._clients: dict[TLSSettings, httpx.AsyncClient] = {}

    def client(self, tls: TLSSettings = TLSSettings()) -> httpx.AsyncClient:
        found = self._clients.get(tls)
        if found is None:
            timeout = httpx.Timeout(self.options.read_timeout, connect=self.options.connect_timeout)
            found = httpx.AsyncClient(
                http2=True, verify=tls.context(), timeout=timeout,
                follow_redirects=True, max_redirects=self.options.max_redirects,
                limits=httpx.Limits(max_keepalive_connections=20, keepalive_expiry=30.0),
                headers={"user-agent": USER_AGENT}, trust_env=False)
            self._clients[tls] = found
        return found

    async def aclose(self) -> None:
        clients, self._clients = list(self._clients.values()), {}
        for client in clients:
            await client.aclose()


# A request body that can be produced again for a retry.
BodyFactory = Callable[[], bytes | AsyncIterator[bytes]]


@dataclass
class Request:
    method: str
    url: str
    host: RegistryHost
    scopes: tuple[str, ...]
    headers: Mapping[str, str] = field(default_factory=dict)
    body: BodyFactory | None = None


def backoff_delay(options: ClientOptions, attempt: int, retry_after: str | None = None) -> float:
    if retry_after is not None:
        try:
            return min(float(retry_after), options.max_backoff)
        except ValueError:
            pass
    base = min(options.backoff * (2 ** attempt), options.max_backoff)
    # Jitter so that many concurrent layer downloads do not retry in lockstep.
    return base * (0.5 + random.random() / 2)


class Transport:
    """Sends registry requests with authorization, retries and error mapping."""

    def __init__(self, pool: HTTPPool, authorizer: Authorizer) -> None:
        self.pool = pool
        self.options = pool.options
        self.authorizer = authorizer

    async def send(self, req: Request, *, ok: tuple[int, ...] = (200,),
                   stream: bool = True) -> httpx.Response:
        """The response to ``req`` with a status in ``ok`` (the caller closes it).

        Other statuses become ctrd errors; retriable failures are retried first.
        """
        client = self.pool.client(req.host.tls)
        auth_rounds = 0
        attempt = 0
        while True:
            headers = dict(req.host.headers)
            headers.update(req.headers)
            authorization = await self.authorizer.header(req.host.host, req.scopes, client)
            if authorization:
                headers["authorization"] = authorization
            body = req.body() if req.body is not None else None
            request = client.build_request(req.method, req.url, headers=headers, content=body)
            try:
                response = await client.send(request, stream=True)
            except httpx.TooManyRedirects as exc:
                raise FailedPrecondition(
                    f"{req.method} {req.url}: too many redirects (a redirect loop?)") from exc
            except httpx.TransportError as exc:
                attempt += 1
                if attempt >= self.options.attempts:
                    raise transport_error(req, exc) from exc
                delay = backoff_delay(self.options, attempt - 1)
                log.info("registry request failed; retrying", method=req.method, url=req.url,
                         error=repr(exc), attempt=attempt, delay=round(delay, 3))
                await asyncio.sleep(delay)
                continue
            status = response.status_code
            if status in ok:
                if not stream:
                    await response.aread()
                return response
            if status == 401 and auth_rounds < AUTH_ROUNDS and \
                    await self.authorizer.on_unauthorized(req.host.host, response, req.scopes):
                auth_rounds += 1
                await response.aclose()
                continue
            if status in RETRY_STATUSES and attempt + 1 < self.options.attempts:
                attempt += 1
                delay = backoff_delay(self.options, attempt - 1,
                                      response.headers.get("retry-after"))
                log.info("registry answered an error; retrying", method=req.method, url=req.url,
                         status=status, attempt=attempt, delay=round(delay, 3))
                await response.aclose()
                await asyncio.sleep(delay)
                continue
            try:
                await response.aread()
            except httpx.HTTPError:
                pass
            finally:
                await response.aclose()
            raise status_error(req, response)


def transport_error(req: Request, exc: httpx.TransportError) -> CtrdError:
    if isinstance(exc, httpx.TimeoutException):
        return DeadlineExceeded(f"{req.method} {req.url}: timed out ({type(exc).__name__})")
    return Unavailable(f"{req.method} {req.url}: {type(exc).__name__}: {exc}")


def _registry_message(response: httpx.Response) -> str:
    """The registry's own error text (distribution's ``{"errors": [...]}``), if any."""
    try:
        body = response.json()
        errors = body.get("errors") or []
        return "; ".join(f"{e.get('code', '')}: {e.get('message', '')}".strip(": ")
                         for e in errors if isinstance(e, dict))
    except (ValueError, AttributeError, httpx.ResponseNotRead):
        return ""


def status_error(req: Request, response: httpx.Response) -> CtrdError:
    status = response.status_code
    detail = _registry_message(response)
    text = f"{req.method} {req.url}: {status} {response.reason_phrase}"
    if detail:
        text += f": {detail}"
    if status == 401:
        return Unauthenticated(
            f"access denied, repository does not exist or may require authorization: {text}")
    if status == 403:
        return PermissionDenied(text)
    if status == 404:
        return NotFound(text)
    if status in (400, 405, 411, 413, 416, 422):
        return InvalidArgument(text)
    if 500 <= status or status in (408, 429):
        return Unavailable(text)
    return FailedPrecondition(text)
