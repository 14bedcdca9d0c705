"""Registry authentication: Docker credentials files, challenges, Basic and Bearer tokens.

A registry answers 401 with ``WWW-Authenticate: Bearer realm=...,service=...,scope=...``
(or ``Basic realm=...``). For Bearer, a token for the repository scopes the request
needs is fetched from the realm (with Basic credentials if we have any, or an OAuth2
refresh token) and cached per (host, scopes) until it expires.
"""
from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from ctrd.errors import InvalidArgument, Unauthenticated
from ctrd.lazyimport import lazy_module

httpx = lazy_module("httpx")  # only pulls and pushes need it

log = structlog.get_logger()

# Tokens without expires_in live this long (the distribution token spec's default).
DEFAULT_TOKEN_LIFETIME = 60.0
# Renew a little early so a token never expires between fetch and use.
EXPIRY_MARGIN = 5.0
DOCKER_HUB_HOSTS = ("docker.io", "index.docker.io", "registry-1.docker.io")


@dataclass(frozen=True)
class Credentials:
    """Username and secret; an empty username with a secret means an identity (refresh) token."""

    username: str = ""
    secret: str = ""

    @property
    def is_refresh_token(self) -> bool:
        return not self.username and bool(self.secret)

    def basic_header(self) -> str:
        raw = f"{self.username}:{self.secret}".encode()
        return "Basic " + base64.b64encode(raw).decode()


# Looks credentials up by registry host; may ask a remote client, hence async.
CredentialsFunc = Callable[[str], Awaitable[Credentials | None]]


def _registry_key(key: str) -> str:
    """``https://index.docker.io/v1/`` -> ``index.docker.io``: the host part of a config key."""
    for prefix in ("https://", "http://"):
        if key.startswith(prefix):
            key = key[len(prefix):]
    return key.split("/", 1)[0]


def load_docker_config(path: str | Path) -> dict[str, Credentials]:
    """Credentials per registry host from a Docker ``config.json`` (``auths`` section)."""
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise InvalidArgument(f"credentials file {path}: {exc}") from exc
    found: dict[str, Credentials] = {}
    for key, entry in (data.get("auths") or {}).items():
        if not isinstance(entry, dict):
            continue
        username = entry.get("username", "")
        secret = entry.get("password", "")
        if entry.get("auth"):
            try:
                decoded = base64.b64decode(entry["auth"]).decode()
            except (ValueError, UnicodeDecodeError) as exc:
                raise InvalidArgument(f"credentials file {path}: bad auth for {key}") from exc
            username, _, secret = decoded.partition(":")
        if entry.get("identitytoken"):
            username, secret = "", entry["identitytoken"]
        if username or secret:
            found[_registry_key(key)] = Credentials(username, secret)
    return found


def file_credentials(path: str | Path) -> CredentialsFunc:
    """A lookup over a Docker config file, re-read on each use so edits apply at once."""

    async def lookup(host: str) -> Credentials | None:
        table = await asyncio.to_thread(load_docker_config, path)
        names = DOCKER_HUB_HOSTS if host in DOCKER_HUB_HOSTS else (host,)
        for name in names:
            if name in table:
                return table[name]
        return None

    return lookup


@dataclass(frozen=True)
class Challenge:
    scheme: str  # lower-case: "basic" or "bearer"
    params: dict[str, str]


def parse_challenges(headers: list[str]) -> list[Challenge]:
    """Parse ``WWW-Authenticate`` values (RFC 7235, as registries write them)."""
    found: list[Challenge] = []
    for header in headers:
        found.extend(_parse_one(header))
    return found


def _parse_one(text: str) -> list[Challenge]:
    challenges: list[Challenge] = []
    pos, n = 0, len(text)
    current: Challenge | None = None
    while pos < n:
        while pos < n and text[pos] in " \t,":
            pos += 1
        start = pos
        while pos < n and text[pos] not in " \t,=":
            pos += 1
        token = text[start:pos]
        if not token:
            break
        while pos < n and text[pos] in " \t":
            pos += 1
        if pos < n and text[pos] == "=" and current is not None:
            pos += 1
            while pos < n and text[pos] in " \t":
                pos += 1
            value, pos = _read_value(text, pos)
            current.params[token.lower()] = value
        else:
            current = Challenge(token.lower(), {})
            challenges.append(current)
    return challenges


def _read_value(text: str, pos: int) -> tuple[str, int]:
    if pos < len(text) and text[pos] == '"':
        pos += 1
        out = []
        while pos < len(text) and text[pos] != '"':
            if text[pos] == "\\" and pos + 1 < len(text):
                pos += 1
            out.append(text[pos])
            pos += 1
        return "".join(out), pos + 1
    start = pos
    while pos < len(text) and text[pos] not in ",":
        pos += 1
    return text[start:pos].strip(), pos


@dataclass
class _Token:
    value: str
    expires: float


@dataclass
class Authorizer:
    """Adds Authorization headers to registry requests and learns from 401 answers.

    One authorizer serves one set of credentials; tokens are cached per
    (host, sorted scopes), challenges per host. Token requests go through the HTTP
    client of the registry endpoint they are for, so its TLS settings apply.
    """

    credentials: CredentialsFunc | None = None
    client_id: str = "ctrd"
    _challenges: dict[str, Challenge] = field(default_factory=dict)
    _tokens: dict[tuple[str, tuple[str, ...]], _Token] = field(default_factory=dict)
    _locks: dict[tuple[str, tuple[str, ...]], asyncio.Lock] = field(default_factory=dict)

    async def _creds(self, host: str) -> Credentials | None:
        return await self.credentials(host) if self.credentials is not None else None

    async def header(self, host: str, scopes: tuple[str, ...],
                     client: httpx.AsyncClient) -> str | None:
        """The Authorization value for a request to ``host`` needing ``scopes``, if known."""
        challenge = self._challenges.get(host)
        if challenge is None:
            return None
        if challenge.scheme == "basic":
            creds = await self._creds(host)
            return creds.basic_header() if creds and not creds.is_refresh_token else None
        if challenge.scheme == "bearer":
            return "Bearer " + await self._token(host, challenge, scopes, client)
        return None

    def knows(self, host: str) -> bool:
        return host in self._challenges

    async def on_unauthorized(self, host: str, response: httpx.Response,
                              scopes: tuple[str, ...]) -> bool:
        """Learn from a 401; True if retrying with new authorization can help.

        A second 401 for a challenge we already answered with a fresh token (or the
        same Basic credentials) means the credentials are not good enough: retrying
        forever would never end, so the caller gets False and reports the failure.
        """
        challenges = parse_challenges(response.headers.get_list("www-authenticate"))
        usable = [c for c in challenges if c.scheme in ("bearer", "basic")]
        if not usable:
            return False
        # Prefer Bearer: it gives scoped tokens, and anonymous pulls work through it.
        challenge = next((c for c in usable if c.scheme == "bearer"), usable[0])
        previous = self._challenges.get(host)
        self._challenges[host] = challenge
        if challenge.scheme == "basic":
            if previous is not None and previous.scheme == "basic":
                return False
            return await self._creds(host) is not None
        key = (host, _token_scopes(challenge, scopes))
        had_token = key in self._tokens
        self._tokens.pop(key, None)
        error = challenge.params.get("error", "")
        # A token we just fetched was refused: new scopes may help once (insufficient_scope
        # names them), an expired token may be renewed; anything else is final.
        return not had_token or error in ("insufficient_scope", "invalid_token")

    async def _token(self, host: str, challenge: Challenge, scopes: tuple[str, ...],
                     client: httpx.AsyncClient) -> str:
        all_scopes = _token_scopes(challenge, scopes)
        key = (host, all_scopes)
        lock = self._locks.setdefault(key, asyncio.Lock())
        async with lock:
            cached = self._tokens.get(key)
            if cached is not None and cached.expires > time.monotonic():
                return cached.value
            token = await self._fetch_token(host, challenge, all_scopes, client)
            self._tokens[key] = token
            return token.value

    async def _fetch_token(self, host: str, challenge: Challenge, scopes: tuple[str, ...],
                           client: httpx.AsyncClient) -> _Token:
        realm = challenge.params.get("realm")
        if not realm:
            raise Unauthenticated(f"{host}: bearer challenge without realm")
        service = challenge.params.get("service", "")
        creds = await self._creds(host)
        try:
            if creds is not None and creds.is_refresh_token:
                response = await client.post(realm, data={
                    "grant_type": "refresh_token", "refresh_token": creds.secret,
                    "service": service, "scope": " ".join(scopes), "client_id": self.client_id,
                })
            else:
                params = [("scope", s) for s in scopes]
                if service:
                    params.insert(0, ("service", service))
                headers = {"authorization": creds.basic_header()} if creds else {}
                response = await client.get(realm, params=params, headers=headers)
        except httpx.HTTPError as exc:
            raise Unauthenticated(f"{host}: fetching token from {realm}: {exc}") from exc
        if response.status_code in (401, 403):
            raise Unauthenticated(
                f"{host}: token server {realm} refused the credentials: {response.status_code}")
        if response.status_code != 200:
            raise Unauthenticated(
                f"{host}: token server {realm} answered {response.status_code}")
        try:
            body = response.json()
        except ValueError as exc:
            raise Unauthenticated(f"{host}: token server {realm} sent no JSON") from exc
        value = body.get("token") or body.get("access_token")
        if not value:
            raise Unauthenticated(f"{host}: token server {realm} sent no token")
        lifetime = float(body.get("expires_in") or DEFAULT_TOKEN_LIFETIME)
        log.debug("registry token fetched", host=host, scopes=scopes, lifetime=lifetime)
        return _Token(value, time.monotonic() + max(lifetime - EXPIRY_MARGIN, 1.0))


def _token_scopes(challenge: Challenge, scopes: tuple[str, ...]) -> tuple[str, ...]:
    """The scopes to ask a token for: the request's own, else those the challenge names.

    The challenge's scope is about the request that got the 401; reusing it for later
    requests to other repositories would ask for (and cache) tokens nobody needs.
    """
    if scopes:
        return tuple(sorted(set(scopes)))
    return tuple(sorted(s for s in challenge.params.get("scope", "").split(" ") if s))


def repository_scope(repository: str, push: bool = False) -> str:
    """The token scope for a repository path (``library/busybox``)."""
    return f"repository:{repository}:{'pull,push' if push else 'pull'}"
