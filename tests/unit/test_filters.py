"""Tests of ctrd.filters against containerd 1.6's filter parser behaviour."""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import pytest

from ctrd import filters
from ctrd.errors import InvalidArgument


@dataclass
class Entry:
    name: str
    other: str = ""
    labels: dict[str, str] = field(default_factory=dict)


# The corpus of containerd's own filter tests, in the same order.
CORPUS = [
    Entry("foo", labels={"foo": "true"}),
    Entry("bar"),
    Entry("foo", labels={"foo": "present", "more complex label": "present"}),
    Entry("bar", labels={"bar": "true"}),
    Entry("fooer", labels={'more complex label with \\ and "': "present"}),
    Entry("fooer", labels={'more complex label with \\ and ".post': "present"}),
    Entry("baz", other="too complex, yo"),
    Entry("bazo", other="abc"),
    Entry("compound", labels={"foo": "omg_asdf.asdf-qwer"}),
]


def adaptor(entry: Entry) -> filters.Adaptor:
    """The hand-written adaptor of containerd's test, to test the parser alone."""

    def lookup(path: filters.FieldPath) -> str | None:
        if path[0] == "name":
            return entry.name or None
        if path[0] == "other":
            return entry.other or None
        if path[0] == "labels":
            return entry.labels.get(".".join(path[1:]))
        return None

    return lookup


def dict_adaptor(entry: Entry) -> filters.Adaptor:
    return filters.adapt({"name": entry.name, "other": entry.other, "labels": entry.labels})


def select(expr: str, adapt=adaptor) -> list[int]:
    f = filters.parse(expr)
    return [i for i, e in enumerate(CORPUS) if f.match(adapt(e))]


ALL = list(range(len(CORPUS)))

MATCH_CASES = [
    ("", ALL),
    ("name", ALL),
    ("labels.foo", [0, 2, 8]),
    ("labels.foo,name", [0, 2, 8]),
    ("labels.foo==true", [0]),
    ("labels.foo==omg_asdf.asdf-qwer", [8]),
    ("name==bar", [1, 3]),
    ("name!=bar", [0, 2, 4, 5, 6, 7, 8]),
    ("name==bar,labels.bar", [3]),
    ('other=="too complex, yo"', [6]),
    ("other~=[abc]+,name!=foo", [6, 7]),
    ("other~=/[abc]+/,name!=foo", [6, 7]),
    ("other~=/[abc]{1,2}/,name!=foo", [6, 7]),
    ('other~=/[abc]{0,1}"\\//,name!=foo', []),
    ("name==bar,labels.bar==true", [3]),
    ("name==bar,labels.bar==wrong", []),
    ('name==foo,labels."more complex label"', [2]),
    ('labels."more complex label with \\\\ and \\""==present', [4]),
    ('labels."more complex label with \\\\ and \\"".post==present', [5]),
]


@pytest.mark.parametrize("expr,expected", MATCH_CASES)
def test_containerd_cases_match(expr: str, expected: list[int]) -> None:
    assert select(expr) == expected


@pytest.mark.parametrize("expr,expected", MATCH_CASES)
def test_containerd_cases_through_adapt(expr: str, expected: list[int]) -> None:
    assert select(expr, dict_adaptor) == expected


ERROR_CASES = [
    ("labels.|foo|==omg_asdf.asdf-qwer",
     "filters: parse error: [labels. >|||< foo|==omg_asdf.asdf-qwer]: invalid quote encountered"),
    ('labels.?"more complex label with \\\\ and \\"".post==present',
     'filters: parse error: [labels. >|?|< "more complex label with \\\\ and \\"".post==present]:'
     " expected field or quoted"),
    ("name==foo,", "filters: parse error: [name==foo,]: expected field or quoted"),
    ("labels.", "filters: parse error: [labels.]: expected field or quoted"),
    ("image~=,id?=?fbaq",
     "filters: parse error: [image~= >|,|< id?=?fbaq]: expected value or quoted"),
    ("labels.ns/key==value",
     "filters: parse error: [labels.ns >|/|< key==value]: quoted literal not terminated"),
    ("labels.key==/value",
     "filters: parse error: [labels.key== >|/|< value]: quoted literal not terminated"),
]


@pytest.mark.parametrize("expr,message", ERROR_CASES)
def test_containerd_error_messages(expr: str, message: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        filters.parse(expr)
    assert str(info.value) == message


@pytest.mark.parametrize(
    "expr,fragment",
    [
        (" ", "[ ]: expected field or quoted"),
        (",", "[ >|,|< ]: expected field or quoted"),
        ("name ,x", '[name  >|,|< x]: expected an operator ("=="|"!="|"~=")'),
        ("name?", '[name >|?|< ]: expected an operator ("=="|"!="|"~=")'),
        ('name"x"', '[name >|"|< x"]: expected an operator'),
        ("a=b", '[a >|=|< b]: unsupported operator "="'),
        ("a===b", 'unsupported operator "==="'),
        ("a=!b", 'unsupported operator "=!"'),
        ("a~b", 'unsupported operator "~"'),
        ("a!b", 'unsupported operator "!"'),
        ("a==", "[a==]: expected value or quoted"),
        ("a==.b", "[a== >|.|< b]: expected value or quoted"),
        ("a~=.*", "[a~= >|.|< *]: expected value or quoted"),  # a leading dot needs quotes
        ("a==b ", "[a==b >| |< ]: unexpected input:  "),
        ("a==b c", "[a==b >| |< c]: unexpected input:  "),
        ('a=="x"y', '[a=="x" >|y|< ]: unexpected input: y'),
        ("a==b,,c", "[a==b, >|,|< c]: expected field or quoted"),
        ("a..b", "[a. >|.|< b]: expected field or quoted"),
        ('a=="unterminated', "quoted literal not terminated"),
        ('a=="line\nbreak"', "quoted literal not terminated"),
        ('"x', "[ >|\"|< x]: quoted literal not terminated"),
        ('a=="\\q"', "illegal escape sequence"),
        ('a=="\\', "illegal escape sequence"),
        ('a=="\\/"', "illegal escape sequence"),  # only the quote in use may be escaped
        ('a=="\\x4"', "illegal numeric escape sequence"),
        ('a=="\\u12g4"', "illegal numeric escape sequence"),
        ('a=="\\08"', "illegal numeric escape sequence"),
        ('a=="\\400"', "unquoting failed: quote syntax error"),
        ('a=="\\U00110000"', "unquoting failed: quote syntax error"),
        ("a==/x/", "invalid quote encountered"),  # / and | quote only regular expressions
        ("a!=|x|", "invalid quote encountered"),
        ('"a"."b"==|x|', "invalid quote encountered"),
        ("a==b\x00", "unexpected input: \ufffd"),
        ("a\x00", "unexpected null"),
        ('a=="b\x00"', "unexpected null"),
        ("\x00", "unexpected null"),
        ("a==\ufffd", "rune error"),
        ("a\ud800", "rune error"),
        ("a~=(x", "[a~= >|(|< x]: invalid regular expression: missing ): (x"),
        ("a~=[z-a]", "invalid regular expression"),
        ("a~=x**", "invalid regular expression"),
        ("a~=(?P=name)", "invalid regular expression"),  # backreferences are not RE2
        ("a~=/\\xff/", "invalid regular expression: invalid UTF-8"),
    ],
)
def test_syntax_errors(expr: str, fragment: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        filters.parse(expr)
    message = str(info.value)
    assert message.startswith("filters: parse error: [")
    assert fragment in message


@pytest.mark.parametrize(
    "expr,path,op,value",
    [
        ("name", ("name",), "?", ""),
        ("  name  ==  bar", ("name",), "==", "bar"),
        ("a.b.c!=d", ("a", "b", "c"), "!=", "d"),
        ("_1.2x==3", ("_1", "2x"), "==", "3"),
        ('labels."io.x/y"==z', ("labels", "io.x/y"), "==", "z"),
        ('labels."a b".c', ("labels", "a b", "c"), "?", ""),
        ("image==docker.io/library/busybox:1.36", ("image",), "==",
         "docker.io/library/busybox:1.36"),
        ("a==x=y!z~", ("a",), "==", "x=y!z~"),
        ("a==x|y|", ("a",), "==", "x|y|"),  # a quote char after the first is plain
        ('a==b"c', ("a",), "==", 'b"c'),
        ("a==café,b", ("a",), "==", "café"),
        ("a=='x'", ("a",), "==", "'x'"),  # single quotes are not quotes here
        ('a==""', ("a",), "==", ""),
        ('a=="\\a\\b\\f\\n\\r\\t\\v\\\\\\""', ("a",), "==", '\a\b\f\n\r\t\v\\"'),
        ('a=="\\x41\\101\\u00e9\\U0001F600"', ("a",), "==", "AAé\U0001F600"),
        ('a=="\\xc3\\xa9"', ("a",), "==", "é"),  # byte escapes assemble UTF-8
        ('a=="\\ud800"', ("a",), "==", "\ufffd"),
        ("a~=/x\\/y/", ("a",), "~=", "x/y"),
        ("a~=|x\\|y|", ("a",), "~=", "x|y"),
        ('a~=/"quoted"/', ("a",), "~=", '"quoted"'),
        ("a~=\"\\\\d+\"", ("a",), "~=", "\\d+"),
        ("a\t==\tb", ("a",), "==", "b"),
        ("a\u3000==b", ("a",), "==", "b"),  # Go counts Unicode spaces as spaces
    ],
)
def test_parsed_selectors(expr: str, path: tuple[str, ...], op: str, value: str) -> None:
    parsed = filters.parse(expr)
    assert isinstance(parsed, filters.AllOf)
    sel = parsed.filters[0]
    assert isinstance(sel, filters.Selector)
    assert (sel.fieldpath, sel.operator.value, sel.value) == (path, op, value)


def test_invalid_utf8_value_never_matches() -> None:
    f = filters.parse('a=="\\xff"')
    assert not f.match(filters.adapt({"a": "\xff"}))
    assert not f.match(filters.adapt({"a": "\ufffd"}))


def test_operator_semantics_on_absent_fields() -> None:
    absent = filters.adapt({})
    assert not filters.parse("x").match(absent)
    assert not filters.parse('x==""').match(absent)
    assert filters.parse("x!=y").match(absent)
    assert not filters.parse('x!=""').match(absent)
    assert filters.parse("x~=^$").match(absent)
    assert filters.parse("x~=/.*/").match(absent)
    assert not filters.parse("x~=/./").match(absent)


def test_regex_is_unanchored_search_and_linear() -> None:
    adapt = filters.adapt({"name": "a" * 5000 + "!"})
    assert filters.parse("name~=a!").match(adapt)
    assert not filters.parse("name~=^a!").match(adapt)
    start = time.monotonic()
    assert not filters.parse("name~=/^(a+)+$/").match(adapt)  # catastrophic for backtrackers
    assert time.monotonic() - start < 1


def test_parse_all_is_or_of_filters() -> None:
    f = filters.parse_all(["name==foo,labels.foo==true", "name==bazo"])
    assert [i for i, e in enumerate(CORPUS) if f.match(adaptor(e))] == [0, 7]
    assert filters.parse_all([]) is filters.ALWAYS
    assert all(filters.parse_all([""]).match(adaptor(e)) for e in CORPUS)
    with pytest.raises(InvalidArgument):
        filters.parse_all(["name==foo", "name=="])


def test_empty_filter_is_always() -> None:
    assert filters.parse("") is filters.ALWAYS
    assert filters.ALWAYS.match(lambda path: None)


def test_adapt_nested_and_maps() -> None:
    obj = {
        "id": "c1",
        "image": "",
        "runtime": {"name": "io.containerd.runc.v2"},
        "target": {"size": 12, "digest": "sha256:ab"},
        "labels": {"a.b": "1", "empty": "", "x": "2"},
        "annotations": {"org.opencontainers.image.ref.name": "latest"},
        "flag": True,
        "none": None,
    }
    a = filters.adapt(obj)
    assert a(("id",)) == "c1"
    assert a(("image",)) is None  # empty scalar fields count as absent
    assert a(("runtime", "name")) == "io.containerd.runc.v2"
    assert a(("runtime",)) is None
    assert a(("runtime", "name", "x")) is None
    assert a(("target", "size")) == "12"
    assert a(("flag",)) == "true"
    assert a(("none",)) is None
    assert a(("labels", "a", "b")) == "1"
    assert a(("labels", "a.b")) == "1"
    assert a(("labels", "empty")) == ""  # a label is present when its key is
    assert a(("labels",)) is None
    assert a(("labels", "missing")) is None
    assert a(("annotations", "org", "opencontainers", "image", "ref", "name")) == "latest"
    assert filters.parse("labels.empty").match(a)
    assert filters.parse("labels.a.b==1,labels.\"a.b\"==1,runtime.name~=runc").match(a)
    assert not filters.parse("image").match(a)


def test_custom_string_maps() -> None:
    a = filters.adapt({"event": {"k.v": "x"}}, string_maps=("event",))
    assert a(("event", "k", "v")) == "x"


@pytest.mark.parametrize("size", [10_000, 1_000_000])
def test_huge_inputs_parse_in_bounded_time(size: int) -> None:
    start = time.monotonic()
    f = filters.parse("labels.a==" + "x" * size)
    assert f.match(filters.adapt({"labels": {"a": "x" * size}}))
    f = filters.parse('labels."' + "k" * size + '"')
    assert f.match(filters.adapt({"labels": {"k" * size: ""}}))
    f = filters.parse(",".join(["name==foo"] * (size // 100)))
    assert len(f.filters) == size // 100
    assert time.monotonic() - start < 10


def test_huge_error_message_is_bounded() -> None:
    expr = "a==" + "x" * 100_000 + " y" + "z" * 100_000
    with pytest.raises(InvalidArgument) as info:
        filters.parse(expr)
    message = str(info.value)
    assert len(message) < 400
    assert ">| |<" in message and "unexpected input" in message


def test_deep_field_path_does_not_recurse() -> None:
    f = filters.parse(".".join(["a"] * 100_000))
    (sel,) = f.filters
    assert len(sel.fieldpath) == 100_000


@pytest.mark.parametrize("junk", ["\x01", "\x7f", "\u200b", "\ue000", "\U000e0001"])
def test_control_and_format_chars_are_not_values(junk: str) -> None:
    # As in containerd, the first character after an operator always starts a value;
    # only the characters that would continue it are checked.
    (sel,) = filters.parse("a==" + junk).filters
    assert sel.value == junk
    with pytest.raises(InvalidArgument):
        filters.parse("a==b" + junk)
