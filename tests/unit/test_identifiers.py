"""Tests of ctrd.identifiers against containerd 1.6's identifier rules."""
from __future__ import annotations

import pytest

from ctrd import identifiers
from ctrd.errors import InvalidArgument

PATTERN = r"^[A-Za-z0-9]+(?:[._-](?:[A-Za-z0-9]+))*$"


@pytest.mark.parametrize(
    "name",
    [
        "default", "Default", "k8s.io", "moby", "a", "0", "foo_bar", "foo-bar", "foo.bar",
        "1.2.3", "a-b_c.d", "ABC123", "0123456789", "x" * 76, "a." + "b" * 74,
        # containerd's own valid cases.
        "default-default", "containerd.io", "foo.boo", "swarmkit.docker.io", "0912341234",
        "task.0.0123456789", "container.system-75-f19a.00", "underscores_are_allowed",
        "TestValidIdentifiers",
    ],
)
def test_valid(name: str) -> None:
    identifiers.validate(name)


@pytest.mark.parametrize(
    "name",
    [
        ".foo", "foo.", "-foo", "foo-", "_foo", "foo_", "foo..bar", "foo.-bar", "foo__bar",
        "foo bar", "foo/bar", "foo\\bar", "foo:bar", "..", ".", "/", "foo\n", "\nfoo",
        "foo\x00", "café", "\u0660", "ＦＯＯ", "foo\t", "a\u200bb",
        # containerd's own invalid cases.
        ".foo..foo", "foo/foo", "foo/..", "foo..foo", "foo.-boo", "-foo.boo", "foo.boo-",
        "but__only_tasteful_underscores", "zn--e9.org", "default--default",
    ],
)
def test_invalid_characters(name: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        identifiers.validate(name)
    assert str(info.value).endswith(f" must match {PATTERN}")


def test_empty() -> None:
    with pytest.raises(InvalidArgument) as info:
        identifiers.validate("")
    assert str(info.value) == "identifier must not be empty"


def test_too_long() -> None:
    name = "x" * 77
    with pytest.raises(InvalidArgument) as info:
        identifiers.validate(name)
    assert str(info.value) == (
        f'identifier "{name}" greater than maximum length (76 characters)'
    )


def test_length_counts_bytes() -> None:
    # 40 two-byte characters are 80 bytes: too long before they are even invalid.
    with pytest.raises(InvalidArgument, match="greater than maximum length"):
        identifiers.validate("é" * 40)


def test_message_wording() -> None:
    with pytest.raises(InvalidArgument) as info:
        identifiers.validate("foo/bar")
    assert str(info.value) == f'identifier "foo/bar" must match {PATTERN}'


@pytest.mark.parametrize(
    "text,quoted",
    [
        ("plain", '"plain"'),
        ('a"b\\c', '"a\\"b\\\\c"'),
        ("\n\t\x00\x7f", '"\\n\\t\\x00\\x7f"'),
        ("é ✓", '"é ✓"'),
        ("\u200b\U000e0001", '"\\u200b\\U000e0001"'),
    ],
)
def test_go_quote(text: str, quoted: str) -> None:
    assert identifiers.go_quote(text) == quoted
