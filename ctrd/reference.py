"""Image references: parsing, validation and Docker-style normalisation.

``busybox`` means ``docker.io/library/busybox:latest``; ``reg:5000/a/b@sha256:...``
names a repository on ``reg:5000`` pinned to a digest; ``[::1]:5000/x:y`` is an IPv6
registry. The grammar is the one of the distribution project (which containerd and
Docker share), so a name accepted here is accepted by every registry and client.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, replace

from ctrd.errors import InvalidArgument
from ctrd.oci import digest as digests

DEFAULT_DOMAIN = "docker.io"
LEGACY_DEFAULT_DOMAIN = "index.docker.io"
OFFICIAL_REPO_PREFIX = "library/"
DEFAULT_TAG = "latest"
NAME_TOTAL_LENGTH_MAX = 255

_DOMAIN_COMPONENT = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_DOMAIN_NAME = rf"{_DOMAIN_COMPONENT}(?:\.{_DOMAIN_COMPONENT})*"
_IPV6 = r"\[[a-fA-F0-9:]+\]"
_DOMAIN = rf"(?:{_DOMAIN_NAME}|{_IPV6})(?::[0-9]+)?"
_PATH_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_PATH = rf"{_PATH_COMPONENT}(?:/{_PATH_COMPONENT})*"
_TAG = r"[\w][\w.-]{0,127}"
_DIGEST = r"[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,}"

_REFERENCE = re.compile(
    rf"(?P<name>(?:(?P<domain>{_DOMAIN})/)?(?P<path>{_PATH}))"
    rf"(?::(?P<tag>{_TAG}))?(?:@(?P<digest>{_DIGEST}))?")
_HEX64 = re.compile(r"[a-f0-9]{64}")


@dataclass(frozen=True)
class Reference:
    """A parsed reference; ``domain`` is empty only for unnormalised short names."""

    domain: str
    path: str
    tag: str = ""
    digest: str = ""

    @property
    def name(self) -> str:
        """The repository, domain included: what a registry's scope and URLs name."""
        return f"{self.domain}/{self.path}" if self.domain else self.path

    @property
    def object(self) -> str:
        """What the manifest endpoint is asked for: the digest if pinned, else the tag."""
        return self.digest or self.tag

    @property
    def hostname(self) -> str:
        """The registry host as used in certs.d and credentials (docker.io stays docker.io)."""
        return self.domain

    def with_tag(self, tag: str) -> Reference:
        return replace(self, tag=tag)

    def with_digest(self, digest: str) -> Reference:
        return replace(self, digest=digest)

    def familiar(self) -> str:
        """The short form Docker shows: ``busybox:latest`` for docker.io/library/busybox."""
        path = self.path
        if self.domain == DEFAULT_DOMAIN:
            short = path.removeprefix(OFFICIAL_REPO_PREFIX)
            if short != path and "/" not in short:
                path = short
            name = path
        else:
            name = self.name
        return _join(name, self.tag, self.digest)

    def __str__(self) -> str:
        return _join(self.name, self.tag, self.digest)


def _join(name: str, tag: str, digest: str) -> str:
    text = name
    if tag:
        text += f":{tag}"
    if digest:
        text += f"@{digest}"
    return text


def parse(text: str) -> Reference:
    """Parse ``text`` exactly as written: no default domain, no default tag."""
    if not text:
        raise InvalidArgument(
            "invalid reference format: repository name must have at least one component")
    found = _REFERENCE.fullmatch(text)
    if found is None:
        if _REFERENCE.fullmatch(text.lower()) is not None:
            raise InvalidArgument(
                f"invalid reference format: repository name must be lowercase: {text!r}")
        raise InvalidArgument(f"invalid reference format: {text!r}")
    if len(found["name"]) > NAME_TOTAL_LENGTH_MAX:
        raise InvalidArgument(
            f"invalid reference format: repository name must not be more than "
            f"{NAME_TOTAL_LENGTH_MAX} characters: {text!r}")
    dgst = found["digest"] or ""
    if dgst:
        digests.validate(dgst)
    return Reference(found["domain"] or "", found["path"], found["tag"] or "", dgst)


def _split_domain(name: str) -> tuple[str, str]:
    """Docker's rule: the first component is a registry only if it looks like a host."""
    first, sep, rest = name.partition("/")
    if not sep or (not any(c in first for c in ".:") and first != "localhost"
                   and first.lower() == first):
        domain, remainder = DEFAULT_DOMAIN, name
    else:
        domain, remainder = first, rest
    if domain == LEGACY_DEFAULT_DOMAIN:
        domain = DEFAULT_DOMAIN
    if domain == DEFAULT_DOMAIN and "/" not in remainder:
        remainder = OFFICIAL_REPO_PREFIX + remainder
    return domain, remainder


def parse_normalized(text: str) -> Reference:
    """Parse a reference as a user types it, filling in docker.io and library/.

    No tag is added; :func:`normalize` does that too.
    """
    if not text:
        raise InvalidArgument("invalid reference format: empty reference")
    if _HEX64.fullmatch(text):
        raise InvalidArgument(
            f"invalid repository name ({text}), cannot specify 64-byte hexadecimal strings")
    # The domain is split off before the grammar sees the rest, so that an upper-case
    # registry host is allowed while an upper-case repository path is not.
    name_end = len(text)
    at = text.find("@")
    if at != -1:
        name_end = at
    slash = text.rfind("/", 0, name_end)
    colon = text.rfind(":", slash + 1, name_end)
    name = text[:colon] if colon != -1 else text[:name_end]
    domain, remainder = _split_domain(name)
    if remainder.lower() != remainder:
        raise InvalidArgument(
            f"invalid reference format: repository name must be lowercase: {text!r}")
    try:
        return parse(f"{domain}/{remainder}{text[len(name):]}")
    except InvalidArgument as exc:
        raise InvalidArgument(f"{exc} (from {text!r})") from None


def normalize(text: str) -> Reference:
    """:func:`parse_normalized`, with ``latest`` as the tag when neither tag nor digest is given."""
    ref = parse_normalized(text)
    if not ref.tag and not ref.digest:
        ref = ref.with_tag(DEFAULT_TAG)
    return ref

