"""Platform specifiers (``linux/amd64``, ``linux/arm/v7``) and which index entries they pick."""
from __future__ import annotations

import platform as host_platform
from collections.abc import Sequence
from dataclasses import dataclass

from ctrd.errors import InvalidArgument
from ctrd.oci.descriptor import Platform

_ARCH_ALIASES = {"x86_64": "amd64", "x86-64": "amd64", "aarch64": "arm64", "armhf": "arm",
                 "armel": "arm", "i386": "386", "i686": "386"}
# Variants a CPU of each (architecture, variant) can also run, best first.
_COMPATIBLE = {
    ("arm", "v8"): ("v8", "v7", "v6", "v5"),
    ("arm", "v7"): ("v7", "v6", "v5"),
    ("arm", "v6"): ("v6", "v5"),
    ("arm", "v5"): ("v5",),
    ("amd64", "v4"): ("v4", "v3", "v2", "v1"),
    ("amd64", "v3"): ("v3", "v2", "v1"),
    ("amd64", "v2"): ("v2", "v1"),
    ("amd64", "v1"): ("v1",),
}


def normalize(p: Platform) -> Platform:
    """Canonical names: aarch64 -> arm64 (variant v8 dropped), x86_64 -> amd64 (v1 dropped)."""
    os_ = p.os.lower()
    arch = _ARCH_ALIASES.get(p.architecture.lower(), p.architecture.lower())
    variant = p.variant.lower()
    if arch == "arm64" and variant in ("v8", "8"):
        variant = ""
    elif arch == "amd64" and variant == "v1":
        variant = ""
    elif arch == "arm":
        if not variant:
            variant = "v7"
        elif variant.isdigit():
            variant = "v" + variant
    return Platform(os_, arch, variant, p.os_version, p.os_features)


def parse(text: str) -> Platform:
    """``os[/arch[/variant]]`` or ``arch`` alone (meaning linux/arch)."""
    parts = [p for p in text.strip().split("/")]
    if not text or any(not p for p in parts) or len(parts) > 3:
        raise InvalidArgument(f"invalid platform specifier {text!r}")
    if len(parts) == 1:
        name = parts[0].lower()
        if name in ("linux", "windows", "darwin", "freebsd"):
            return normalize(Platform(name, host().architecture))
        return normalize(Platform("linux", name))
    return normalize(Platform(parts[0], parts[1], parts[2] if len(parts) == 3 else ""))


def host() -> Platform:
    machine = host_platform.machine().lower()
    return normalize(Platform("linux", _ARCH_ALIASES.get(machine, machine),
                              "v7" if machine.startswith("armv7") else ""))


def _variants(p: Platform) -> tuple[str, ...]:
    if p.architecture == "amd64" and not p.variant:
        return ("",)
    return _COMPATIBLE.get((p.architecture, p.variant or "v1"), (p.variant,))


@dataclass(frozen=True)
class Matcher:
    """Matches index entries against wanted platforms; earlier ones rank higher.

    An empty ``wanted`` matches every platform (containerd's ``platforms.All``).
    """

    wanted: tuple[Platform, ...]

    @classmethod
    def of(cls, platforms: Sequence[Platform]) -> Matcher:
        return cls(tuple(normalize(p) for p in platforms))

    @property
    def matches_all(self) -> bool:
        return not self.wanted

    def rank(self, candidate: Platform | None) -> int | None:
        """Lower is better; None when ``candidate`` does not match."""
        if not self.wanted:
            return 0
        if candidate is None:
            return None
        c = normalize(candidate)
        for index, want in enumerate(self.wanted):
            if c.os != want.os or c.architecture != want.architecture:
                continue
            variants = _variants(want)
            cv = c.variant
            if want.architecture == "amd64":
                # An amd64 host runs the baseline too; higher levels only if asked for.
                allowed = variants if want.variant else ("",)
                if cv in allowed or (cv == "v1"):
                    return index * 10 + (allowed.index(cv) if cv in allowed else 0)
                continue
            if cv in variants:
                return index * 10 + variants.index(cv)
        return None

    def match(self, candidate: Platform | None) -> bool:
        return self.rank(candidate) is not None
