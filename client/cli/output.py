"""Printing results: aligned plain tables for people, JSON for programs."""
from __future__ import annotations

import dataclasses
import json
import sys
import time
from collections.abc import Sequence
from typing import Any

import click

FORMATS = click.Choice(["table", "json"], case_sensitive=False)
INSPECT_FORMATS = click.Choice(["json"], case_sensitive=False)


def format_option(default: str = "table"):
    choices = FORMATS if default == "table" else INSPECT_FORMATS
    return click.option("--format", "fmt", type=choices, default=default, show_default=True,
                        help="Output format.")


def to_data(value: Any) -> Any:
    """JSON-ready data from dataclasses, lists and dicts."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_data(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(k): to_data(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_data(v) for v in value]
    return value


def print_json(value: Any) -> None:
    click.echo(json.dumps(to_data(value), indent=2, sort_keys=False))


def print_json_line(value: Any) -> None:
    click.echo(json.dumps(to_data(value), separators=(",", ":")))


def print_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    cells = [[str(c) for c in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in cells:
        for i, cell in enumerate(row):
            widths[i] = max(widths[i], len(cell))
    for row in [list(headers), *cells]:
        line = "   ".join(cell.ljust(widths[i]) for i, cell in enumerate(row))
        click.echo(line.rstrip())


def human_size(size: int) -> str:
    value = float(size)
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if value < 1000 or unit == "TB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.3g} {unit}"
        value /= 1000
    return f"{size} B"


def ago(ns: int, now: float | None = None) -> str:
    if not ns:
        return ""
    seconds = max(0, (now or time.time()) - ns / 1e9)
    for unit, span in (("day", 86400), ("hour", 3600), ("minute", 60)):
        if seconds >= span:
            count = int(seconds // span)
            return f"{count} {unit}{'s' if count != 1 else ''} ago"
    return f"{int(seconds)} seconds ago"


def error(message: str) -> None:
    click.echo(f"ctrctl: {message}", err=True)


def stdout_is_tty() -> bool:
    return sys.stdout.isatty()
