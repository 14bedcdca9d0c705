"""Content digests (``algorithm:hex``) as OCI descriptors carry them."""
from __future__ import annotations

import functools
import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from ctrd.errors import InvalidArgument

# Hex length of each algorithm the image spec registers.
ALGORITHMS = {"sha256": 64, "sha384": 96, "sha512": 128}
CANONICAL = "sha256"
# The grammar of the image spec; algorithms it allows but that we do not know are
# told apart from malformed strings so that the error says which it is.
_GRAMMAR = re.compile(r"([a-z0-9]+(?:[.+_-][a-z0-9]+)*):([a-zA-Z0-9=_-]+)")
_LOWER_HEX = re.compile(r"[a-f0-9]+")
_CHUNK = 1 << 20


@dataclass(frozen=True)
class Digest:
    algorithm: str
    hex: str

    def __str__(self) -> str:
        return f"{self.algorithm}:{self.hex}"

    @classmethod
    def parse(cls, text: str) -> Digest:
        """Validate ``text``; raise InvalidArgument naming what is wrong with it."""
        return _parse(text)

    @classmethod
    def _checked(cls, text: str) -> Digest:
        found = _GRAMMAR.fullmatch(text)
        if not found:
            raise InvalidArgument(f"invalid checksum digest format: {text!r}")
        algorithm, encoded = found.groups()
        if algorithm not in ALGORITHMS:
            raise InvalidArgument(f"unsupported digest algorithm: {text!r}")
        if len(encoded) != ALGORITHMS[algorithm]:
            raise InvalidArgument(f"invalid checksum digest length: {text!r}")
        if not _LOWER_HEX.fullmatch(encoded):
            raise InvalidArgument(f"invalid checksum digest format: {text!r}")
        return cls(algorithm, encoded)

    def hasher(self) -> hashlib._Hash:
        """A fresh hasher of this digest's algorithm, to verify content against it."""
        return hashlib.new(self.algorithm)


@functools.lru_cache(maxsize=1024)
def _parse(text: str) -> Digest:
    # The same few digests are checked over and over (each 32 KiB Content.Read names
    # its blob); a parse failure raises and is not cached.
    return Digest._checked(text)


def validate(text: str) -> None:
    Digest.parse(text)


def is_valid(text: str) -> bool:
    try:
        Digest.parse(text)
    except InvalidArgument:
        return False
    return True


def _check_algorithm(algorithm: str) -> None:
    if algorithm not in ALGORITHMS:
        raise InvalidArgument(f"unsupported digest algorithm: {algorithm!r}")


def of_bytes(data: bytes, algorithm: str = CANONICAL) -> Digest:
    _check_algorithm(algorithm)
    return Digest(algorithm, hashlib.new(algorithm, data).hexdigest())


def of_stream(stream: BinaryIO, algorithm: str = CANONICAL) -> tuple[Digest, int]:
    """Digest and size of everything left in ``stream``."""
    _check_algorithm(algorithm)
    hasher = hashlib.new(algorithm)
    size = 0
    while chunk := stream.read(_CHUNK):
        hasher.update(chunk)
        size += len(chunk)
    return Digest(algorithm, hasher.hexdigest()), size


def of_file(path: str | Path, algorithm: str = CANONICAL) -> tuple[Digest, int]:
    """Digest and size of a file's content."""
    with open(path, "rb") as stream:
        return of_stream(stream, algorithm)
