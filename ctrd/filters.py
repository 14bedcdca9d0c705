"""containerd's filter language, shared by every List RPC and by event subscriptions.

A filter string is a comma separated list of selectors that must all match; a selector
is a dot separated field path, optionally followed by an operator (``==``, ``!=`` or
``~=``) and a value. A selector without an operator asks whether the field is present.
A request carrying several filter strings matches when any of them does.

Field path components are bare words (``[A-Za-z0-9_]+``) or double-quoted strings
(``labels."io.x/y"``). Values are bare (anything up to a comma or whitespace) or
quoted: with ``"``, or, for ``~=`` only, with ``/`` or ``|`` as well, which spares
the escaping of quotes inside regular expressions. Note that ``|`` is a quote in this
language, never an "or": alternatives are separate filter strings.

The scanner and parser follow containerd 1.6 closely, down to error positions and
messages, because clients such as ``ctr`` print those messages to users. Two
deliberate differences: a bad regular expression is rejected when the filter is
parsed (containerd only logs it and matches nothing), and error messages on very
long input show a window around the error rather than the whole input, so that the
message fits in a gRPC trailer. Positions count characters, not UTF-8 bytes.

Regular expressions use RE2, the engine whose syntax Go's ``regexp`` package
implements; it also runs in linear time, so a hostile pattern cannot stall a List.
"""
from __future__ import annotations

import enum
import re
import unicodedata
from abc import ABC, abstractmethod
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import re2

from ctrd.errors import InvalidArgument

FieldPath = tuple[str, ...]
# Returns the field's value, or None when the object has no such field.
Adaptor = Callable[[FieldPath], "str | None"]


class Operator(enum.Enum):
    PRESENT = "?"
    EQUAL = "=="
    NOT_EQUAL = "!="
    MATCHES = "~="


class Filter(ABC):
    @abstractmethod
    def match(self, adaptor: Adaptor) -> bool:
        """Whether the object seen through ``adaptor`` passes this filter."""


class _Always(Filter):
    def match(self, adaptor: Adaptor) -> bool:
        return True

    def __repr__(self) -> str:
        return "ALWAYS"


ALWAYS: Filter = _Always()


@dataclass(frozen=True)
class Selector(Filter):
    fieldpath: FieldPath
    operator: Operator
    value: str = ""
    pattern: Any = field(default=None, compare=False, repr=False)  # compiled RE2 for MATCHES

    def match(self, adaptor: Adaptor) -> bool:
        found = adaptor(self.fieldpath)
        if self.operator is Operator.PRESENT:
            return found is not None
        if self.operator is Operator.EQUAL:
            return found is not None and found == self.value
        # containerd compares an absent field as the empty string for these two.
        text = "" if found is None else found
        if self.operator is Operator.NOT_EQUAL:
            return text != self.value
        return self.pattern.search(text) is not None


@dataclass(frozen=True)
class AllOf(Filter):
    filters: tuple[Filter, ...]

    def match(self, adaptor: Adaptor) -> bool:
        return all(f.match(adaptor) for f in self.filters)


@dataclass(frozen=True)
class AnyOf(Filter):
    filters: tuple[Filter, ...]

    def match(self, adaptor: Adaptor) -> bool:
        return any(f.match(adaptor) for f in self.filters)


def parse(expr: str) -> Filter:
    """Parse one filter string; the empty string matches everything.

    Raises InvalidArgument, with the position of the fault, on any syntax error or
    invalid regular expression.
    """
    if expr == "":
        return ALWAYS
    return _Parser(expr).selectors()


def parse_all(exprs: Sequence[str]) -> Filter:
    """Parse the filters of a List request: any of them may match; none means all."""
    if not exprs:
        return ALWAYS
    return AnyOf(tuple(parse(e) for e in exprs))


def adapt(
    obj: Mapping[str, Any], *, string_maps: Collection[str] = ("labels", "annotations")
) -> Adaptor:
    """An adaptor over a nested dict, with the presence rules of containerd's adaptors.

    Path components walk nested mappings. A string field is present when it is not
    empty; None means absent; ints and bools are shown as Go would print them. Keys
    named in ``string_maps`` hold free-form string maps (labels): the rest of the path
    is joined with dots to form the key, so ``labels.a.b`` and ``labels."a.b"`` both
    find the label ``a.b``, and a label is present whenever its key exists.
    """

    def lookup(fieldpath: FieldPath) -> str | None:
        node: Any = obj
        for i, part in enumerate(fieldpath):
            if not isinstance(node, Mapping):
                return None
            child = node.get(part)
            if part in string_maps and isinstance(child, Mapping):
                value = child.get(".".join(fieldpath[i + 1:]))
                return value if isinstance(value, str) else None
            node = child
        return _scalar(node)

    return lookup


def _scalar(value: Any) -> str | None:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str) and value:
        return value
    return None


# ---------------------------------------------------------------------------
# Scanner

# Characters come back as one-character strings; these two stand for the end of
# input and for a character the scanner refused. U+FFFD doubles as "refused"
# because Go decodes both invalid UTF-8 and a literal U+FFFD to that same rune and
# refuses either, and because containerd prints a refused rune as U+FFFD.
_EOF = ""
_ILLEGAL = "\ufffd"


class _Tok(enum.Enum):
    EOF = "EOF"
    QUOTED = "Quoted"
    VALUE = "Value"
    FIELD = "Field"
    SEPARATOR = "Separator"
    OPERATOR = "Operator"
    ILLEGAL = "Illegal"
    OTHER = "Other"  # any other single character


_QUOTES = frozenset("/|\"")
_SEPARATORS = frozenset(",.")
_OPERATOR_CHARS = frozenset("=!~")
# Go's unicode.IsSpace: the Latin-1 spaces plus the White_Space property beyond.
_SPACES = frozenset(
    "\t\n\v\f\r \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007"
    "\u2008\u2009\u200a\u2028\u2029\u202f\u205f\u3000"
)
_FIELD_RUN = re.compile(r"[A-Za-z0-9_]*")
# Printable ASCII except the comma: the common case of a bare value, matched at once.
_ASCII_VALUE_RUN = re.compile(r"[!-+\--~]*")
_SIMPLE_ESCAPES = frozenset("abfnrtv\\")
_HEX = frozenset("0123456789abcdefABCDEF")
_OCTAL = frozenset("01234567")


def _is_field_char(ch: str) -> bool:
    return ch != _EOF and ch.isascii() and (ch.isalnum() or ch == "_")


def _is_value_char(ch: str) -> bool:
    """Go's letter/digit/graphic/punct test: categories L, M, N, P, S, less spaces and ','."""
    if ch in (_EOF, ",", _ILLEGAL) or ch in _SPACES:
        return False
    if " " < ch < "\x7f":
        return True
    return unicodedata.category(ch)[0] in "LMNPS"


class _Scanner:
    """Tokenizer with one character of lookahead.

    ``start`` is where the character read last begins and ``end`` where it stops;
    error positions are reported from them exactly as containerd's scanner does.
    """

    def __init__(self, text: str) -> None:
        self.text = text
        self.start = 0
        self.end = 0
        self.in_value = False  # an operator was just read, so a bare word is a value
        self.error = ""

    def _fail(self, message: str) -> None:
        # Only the first complaint is kept: it is the cause, later ones are fallout.
        if not self.error:
            self.error = message

    def next(self) -> str:
        self.start = self.end
        if self.end >= len(self.text):
            return _EOF
        ch = self.text[self.end]
        self.end += 1
        if ch == "\ufffd" or "\ud800" <= ch <= "\udfff":
            self._fail("rune error")
            return _ILLEGAL
        if ch == "\0":
            self._fail("unexpected null")
            return _ILLEGAL
        return ch

    def peek(self) -> str:
        saved = (self.start, self.end)
        ch = self.next()
        self.start, self.end = saved
        return ch

    def scan(self) -> tuple[int, _Tok, str]:
        ch = self.next()
        while ch in _SPACES:
            ch = self.next()
        pos = self.start
        if ch == _EOF:
            return pos, _Tok.EOF, ""
        if ch == _ILLEGAL:
            return pos, _Tok.ILLEGAL, ""
        if ch in _QUOTES:
            ok = self._scan_quoted(ch)
            return pos, _Tok.QUOTED if ok else _Tok.ILLEGAL, self.text[pos:self.end]
        if ch in _SEPARATORS:
            self.in_value = False
            return pos, _Tok.SEPARATOR, ch
        if ch in _OPERATOR_CHARS:
            while self.peek() in _OPERATOR_CHARS:
                self.next()
            self.in_value = True
            return pos, _Tok.OPERATOR, self.text[pos:self.end]
        if self.in_value:
            self._scan_value()
            self.in_value = False
            return pos, _Tok.VALUE, self.text[pos:self.end]
        if _is_field_char(ch):
            self._skip_to(_FIELD_RUN.match(self.text, self.end).end())
            return pos, _Tok.FIELD, self.text[pos:self.end]
        return pos, _Tok.OTHER, ch

    def _skip_to(self, index: int) -> None:
        """Consume plain characters up to ``index`` in one step."""
        if index > self.end:
            self.start, self.end = index - 1, index

    def _scan_value(self) -> None:
        while True:
            self._skip_to(_ASCII_VALUE_RUN.match(self.text, self.end).end())
            if not _is_value_char(self.peek()):
                return
            self.next()

    def _scan_quoted(self, quote: str) -> bool:
        """Consume a quoted literal up to its closing quote; False if it is malformed."""
        valid = True
        ch = self.next()
        while ch != quote:
            if ch in (_EOF, _ILLEGAL, "\n"):
                self._fail("quoted literal not terminated")
                return False
            if ch == "\\":
                ch, legal = self._scan_escape(quote)
                valid = valid and legal
            else:
                ch = self.next()
        return valid

    def _scan_escape(self, quote: str) -> tuple[str, bool]:
        """Check the escape after a backslash; returns the character that follows it."""
        ch = self.next()
        if ch in _SIMPLE_ESCAPES or ch == quote:
            return self.next(), True
        if ch in _OCTAL:
            return self._scan_digits(ch, _OCTAL, 3)
        if ch == "x":
            return self._scan_digits(self.next(), _HEX, 2)
        if ch == "u":
            return self._scan_digits(self.next(), _HEX, 4)
        if ch == "U":
            return self._scan_digits(self.next(), _HEX, 8)
        self._fail("illegal escape sequence")
        return ch, False

    def _scan_digits(self, ch: str, digits: frozenset[str], count: int) -> tuple[str, bool]:
        while count > 0 and ch in digits:
            ch = self.next()
            count -= 1
        if count > 0:
            self._fail("illegal numeric escape sequence")
            return ch, False
        return ch, True


class _QuoteError(ValueError):
    pass


def _unquote(literal: str) -> str:
    """Decode a quoted literal that the scanner accepted, with Go's escape rules.

    ``\\x`` and octal escapes give raw bytes, so the result is assembled as bytes;
    bytes that are not UTF-8 survive as surrogate escapes and so never equal a real
    field value, as in Go where they would be compared byte for byte.
    """
    quote, body = literal[0], literal[1:-1]
    if "\\" not in body:
        return body
    out = bytearray()
    i = 0
    while i < len(body):
        ch = body[i]
        if ch != "\\":
            out += ch.encode("utf-8", "surrogateescape")
            i += 1
            continue
        kind = body[i + 1]
        i += 2
        if kind in "xuU":
            width = {"x": 2, "u": 4, "U": 8}[kind]
            code = int(body[i:i + width], 16)
            i += width
            if kind == "x":
                out.append(code)
            elif code > 0x10FFFF:
                raise _QuoteError
            elif 0xD800 <= code <= 0xDFFF:
                out += "\ufffd".encode()  # Go encodes a surrogate code point as U+FFFD
            else:
                out += chr(code).encode()
        elif kind in _OCTAL:
            code = int(body[i - 1:i + 2], 8)
            i += 2
            if code > 0xFF:
                raise _QuoteError
            out.append(code)
        elif kind == "\\" or kind == quote:
            out += kind.encode()
        else:
            out += {"a": b"\a", "b": b"\b", "f": b"\f", "n": b"\n",
                    "r": b"\r", "t": b"\t", "v": b"\v"}[kind]
    return out.decode("utf-8", "surrogateescape")


# ---------------------------------------------------------------------------
# Parser

_OPERATORS = {op.value: op for op in Operator if op is not Operator.PRESENT}
# Beyond this length an error message quotes only a window around the fault.
_CONTEXT_LIMIT = 256
_CONTEXT_WINDOW = 64


class _Parser:
    def __init__(self, text: str) -> None:
        self.text = text
        self.scanner = _Scanner(text)

    def selectors(self) -> Filter:
        found = [self.selector()]
        while True:
            ch = self.scanner.peek()
            if ch == _EOF:
                return AllOf(tuple(found))
            if ch != ",":
                raise self.error(self.scanner.end, f"unexpected input: {ch}")
            self.scanner.scan()
            found.append(self.selector())

    def selector(self) -> Selector:
        path = self.fieldpath()
        if self.scanner.peek() in (",", _EOF):
            return Selector(path, Operator.PRESENT)
        op = self.operator()
        pos, value = self.value(allow_regex_quotes=op is Operator.MATCHES)
        if op is not Operator.MATCHES:
            return Selector(path, op, value)
        return Selector(path, op, value, self.compile(pos, value))

    def fieldpath(self) -> FieldPath:
        parts = [self.field()]
        while self.scanner.peek() == ".":
            self.scanner.scan()
            parts.append(self.field())
        return tuple(parts)

    def field(self) -> str:
        pos, tok, text = self.scanner.scan()
        if tok is _Tok.FIELD:
            return text
        if tok is _Tok.QUOTED:
            return self.unquote(pos, text, allow_regex_quotes=False)
        if tok is _Tok.ILLEGAL:
            raise self.error(pos, self.scanner.error)
        raise self.error(pos, "expected field or quoted")

    def operator(self) -> Operator:
        pos, tok, text = self.scanner.scan()
        if tok is _Tok.OPERATOR:
            if text not in _OPERATORS:
                raise self.error(pos, f'unsupported operator "{text}"')
            return _OPERATORS[text]
        if tok is _Tok.ILLEGAL:
            raise self.error(pos, self.scanner.error)
        raise self.error(pos, 'expected an operator ("=="|"!="|"~=")')

    def value(self, *, allow_regex_quotes: bool) -> tuple[int, str]:
        pos, tok, text = self.scanner.scan()
        if tok in (_Tok.VALUE, _Tok.FIELD):
            return pos, text
        if tok is _Tok.QUOTED:
            return pos, self.unquote(pos, text, allow_regex_quotes=allow_regex_quotes)
        if tok is _Tok.ILLEGAL:
            raise self.error(pos, self.scanner.error)
        raise self.error(pos, "expected value or quoted")

    def unquote(self, pos: int, literal: str, *, allow_regex_quotes: bool) -> str:
        if not allow_regex_quotes and literal[0] != '"':
            raise self.error(pos, "invalid quote encountered")
        try:
            return _unquote(literal)
        except _QuoteError:
            raise self.error(pos, "unquoting failed: quote syntax error") from None

    def compile(self, pos: int, pattern: str) -> Any:
        options = re2.Options()
        options.log_errors = False  # the error is reported to the caller instead
        try:
            return re2.compile(pattern, options=options)
        except UnicodeEncodeError:
            raise self.error(pos, "invalid regular expression: invalid UTF-8") from None
        except re2.error as exc:
            detail = exc.args[0] if exc.args else ""
            if isinstance(detail, bytes):
                detail = detail.decode("utf-8", "replace")
            raise self.error(pos, f"invalid regular expression: {detail}") from None

    def error(self, pos: int, message: str) -> InvalidArgument:
        return InvalidArgument(f"filters: parse error: {self.context(pos)}: {message}")

    def context(self, pos: int) -> str:
        """The input with the faulty character marked, as containerd shows it."""
        text = self.text
        if pos >= len(text):
            before, mark, after = text, None, ""
        else:
            before, mark, after = text[:pos], text[pos], text[pos + 1:]
        if len(text) > _CONTEXT_LIMIT:
            if len(before) > _CONTEXT_WINDOW:
                before = "..." + before[-_CONTEXT_WINDOW:]
            if len(after) > _CONTEXT_WINDOW:
                after = after[:_CONTEXT_WINDOW] + "..."
        if mark is None:
            return f"[{before}]"
        return f"[{before} >|{mark}|< {after}]"
