"""From an image reference to a :class:`Repository` ready to talk to its registry."""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace

from ctrd.reference import Reference

from .auth import Authorizer, CredentialsFunc
from .hosts import HostsConfig
from .registry import Repository
from .transport import HTTPPool, Transport


class Resolver:
    """Binds hosts configuration, credentials and extra headers for a series of requests.

    The HTTP pool is shared (and outlives the resolver); the authorizer, and so the
    token cache, belongs to this resolver because tokens depend on the credentials.
    """

    def __init__(self, pool: HTTPPool, hosts: HostsConfig, *,
                 credentials: CredentialsFunc | None = None,
                 headers: Mapping[str, str] | None = None) -> None:
        self.pool = pool
        self.hosts = hosts
        self.headers = dict(headers or {})
        self.transport = Transport(pool, Authorizer(credentials))

    def repository(self, ref: Reference) -> Repository:
        hosts = self.hosts.hosts(ref.domain)
        if self.headers:
            extra = tuple(self.headers.items())
            hosts = [replace(h, headers=h.headers + extra) for h in hosts]
        return Repository(self.transport, hosts, ref)
