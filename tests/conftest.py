"""Shared fixtures: a real ctrd daemon per test (or per module), cleaned up always."""
from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from helpers.containerd_ref import remove_namespace_dirs  # noqa: E402
from helpers.ctrd_proc import CtrdProcess, new_base  # noqa: E402


def _cleanup(base: Path) -> None:
    # Unmount anything a failed test left below its temporary root, deepest first.
    mounts = [line.split()[1] for line in Path("/proc/mounts").read_text().splitlines()]
    for target in sorted((m for m in mounts if m.startswith(str(base))), reverse=True):
        subprocess.run(["umount", "-l", target], check=False)
    shutil.rmtree(base, ignore_errors=True)
    # Containers' parent cgroups (/<namespace>) outlive them, as under containerd; only
    # empty ones are removed, so a cgroup in use elsewhere stays.
    remove_namespace_dirs(["default"])


@pytest.fixture
def ctrd() -> Iterator[CtrdProcess]:
    base = new_base()
    daemon = CtrdProcess(base).start()
    try:
        yield daemon
    finally:
        daemon.stop()
        _cleanup(base)


@pytest.fixture
def ctrd_factory() -> Iterator:
    """Build daemons with custom arguments; every one is stopped and cleaned up."""
    made: list[CtrdProcess] = []

    def make(**kwargs) -> CtrdProcess:
        daemon = CtrdProcess(new_base(), **kwargs)
        made.append(daemon)
        return daemon

    try:
        yield make
    finally:
        for daemon in made:
            daemon.stop()
            _cleanup(daemon.base)
