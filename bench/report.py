"""Rows of results, their medians and ratios, printed as a table and saved as JSON."""
from __future__ import annotations

import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

OK, UNAVAILABLE, SKIPPED, ERROR = "ok", "unavailable", "skipped", "error"


@dataclass(frozen=True)
class Metric:
    """One number a workload measures per repetition, on each daemon."""

    key: str
    title: str
    unit: str
    higher_is_better: bool = False


@dataclass
class Row:
    metric: Metric
    status: str = OK
    reason: str = ""
    ctrd: list[float] = field(default_factory=list)
    containerd: list[float] = field(default_factory=list)
    floor: list[float] = field(default_factory=list)  # runc alone, where it applies
    # Repetition index -> value, so that ratios pair runs made side by side.
    _ctrd_by_rep: dict[int, float] = field(default_factory=dict, repr=False)
    _containerd_by_rep: dict[int, float] = field(default_factory=dict, repr=False)

    def add(self, daemon: str, rep: int, value: float) -> None:
        getattr(self, daemon).append(value)
        getattr(self, f"_{daemon}_by_rep")[rep] = value

    @property
    def ratios(self) -> list[float]:
        return [self._ctrd_by_rep[rep] / other
                for rep, other in sorted(self._containerd_by_rep.items())
                if rep in self._ctrd_by_rep and other > 0]

    def to_json(self) -> dict[str, Any]:
        return {
            **asdict(self.metric),
            "status": self.status,
            "reason": self.reason,
            "ctrd": {"samples": self.ctrd, "median": _median(self.ctrd)},
            "containerd": {"samples": self.containerd, "median": _median(self.containerd)},
            "floor_runc": {"samples": self.floor, "median": _median(self.floor)}
            if self.floor else None,
            "ratio": {"samples": self.ratios, "median": _median(self.ratios)},
        }


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def _fmt(value: float | None, unit: str = "") -> str:
    if value is None:
        return "-"
    if unit == "s":
        return f"{value * 1000:.1f} ms" if value < 1 else f"{value:.2f} s"
    text = f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
    return f"{text} {unit}".strip()


def table(rows: list[Row]) -> str:
    """A fixed-width table: medians of each daemon, of the runc floor, and of the ratios."""
    header = ("workload", "ctrd", "containerd", "ctrd/containerd", "runc floor")
    lines: list[tuple[str, ...]] = [header]
    notes: list[str] = []
    for row in rows:
        title = row.metric.title + (" (higher is better)" if row.metric.higher_is_better else "")
        if row.status != OK and not row.ctrd and not row.containerd:
            lines.append((title, row.status, "", "", ""))
            notes.append(f"{row.metric.title}: {row.status}: {row.reason}")
            continue
        ratio = _median(row.ratios)
        lines.append((
            title,
            _fmt(_median(row.ctrd), row.metric.unit) if row.ctrd else row.status,
            _fmt(_median(row.containerd), row.metric.unit),
            f"{ratio:.2f}x" if ratio is not None else "-",
            _fmt(_median(row.floor), row.metric.unit) if row.floor else "",
        ))
        if row.reason:
            notes.append(f"{row.metric.title}: {row.status}: {row.reason}")
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    out = []
    for n, line in enumerate(lines):
        out.append("  ".join(cell.ljust(widths[i]) if i == 0 else cell.rjust(widths[i])
                             for i, cell in enumerate(line)).rstrip())
        if n == 0:
            out.append("  ".join("-" * w for w in widths))
    if notes:
        out.append("")
        out.extend(notes)
    return "\n".join(out)


def machine() -> dict[str, Any]:
    """What the numbers were measured on, for the README and for comparing runs."""
    cpu = ""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    mem_kib = int(Path("/proc/meminfo").read_text().split()[1])
    return {
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "memory_gib": round(mem_kib / 2**20, 1),
        "kernel": platform.release(),
        "python": sys.version.split()[0],
        "containerd": _version(["containerd", "--version"]),
        "runc": _version(["runc", "--version"]).splitlines()[0] if shutil.which("runc") else "",
    }


def _version(cmd: list[str]) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return ""


def write_json(path: Path, rows: list[Row], settings: dict[str, Any],
               duration: float) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    body = {"machine": machine(), "settings": settings, "duration_s": round(duration, 2),
            "rows": [row.to_json() for row in rows]}
    path.write_text(json.dumps(body, indent=2) + "\n")
