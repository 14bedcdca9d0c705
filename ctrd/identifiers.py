"""Validation of the names containerd calls identifiers: namespaces, containers, tasks,
snapshot keys of CRI, leases.

The rules keep an identifier safe to use as one path component: ASCII letters and
digits, with single dots, underscores or dashes between runs of them, at most 76
bytes. Error messages have containerd's wording, since clients show them to users.
"""
from __future__ import annotations

import re
import unicodedata

from ctrd.errors import InvalidArgument

MAX_LENGTH = 76
# Shown in error messages in the spelling containerd uses for the same rule.
PATTERN = r"^[A-Za-z0-9]+(?:[._-](?:[A-Za-z0-9]+))*$"
_IDENTIFIER = re.compile(r"[A-Za-z0-9]+(?:[._-][A-Za-z0-9]+)*")


def validate(name: str) -> None:
    """Raise InvalidArgument unless ``name`` is a valid identifier."""
    if not name:
        raise InvalidArgument("identifier must not be empty")
    # The limit counts bytes, as Go's len() does.
    if len(name.encode("utf-8", "surrogatepass")) > MAX_LENGTH:
        raise InvalidArgument(
            f"identifier {go_quote(name)} greater than maximum length ({MAX_LENGTH} characters)"
        )
    if not _IDENTIFIER.fullmatch(name):
        raise InvalidArgument(f"identifier {go_quote(name)} must match {PATTERN}")


_NAMED_ESCAPES = {
    "\a": "\\a", "\b": "\\b", "\f": "\\f", "\n": "\\n",
    "\r": "\\r", "\t": "\\t", "\v": "\\v", "\\": "\\\\", '"': '\\"',
}


def go_quote(text: str) -> str:
    """Quote ``text`` as Go's %q verb does, so messages read the same as containerd's."""
    out = ['"']
    for ch in text:
        if ch in _NAMED_ESCAPES:
            out.append(_NAMED_ESCAPES[ch])
        elif ch == " " or unicodedata.category(ch)[0] in "LMNPS":
            out.append(ch)
        elif ord(ch) < 0x80:
            out.append(f"\\x{ord(ch):02x}")
        elif ord(ch) < 0x10000:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(f"\\U{ord(ch):08x}")
    out.append('"')
    return "".join(out)
