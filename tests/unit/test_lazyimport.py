"""Modules loaded on first use (the daemon's httpx)."""
from __future__ import annotations

import subprocess
import sys

import pytest

from ctrd.lazyimport import lazy_module


def test_runs_the_module_on_first_attribute_access() -> None:
    code = ("import sys\n"
            "from ctrd.lazyimport import lazy_module\n"
            "m = lazy_module('colorsys')\n"
            "assert type(m).__name__ == '_LazyModule', type(m)\n"
            "assert m.rgb_to_hsv(1.0, 0.0, 0.0) == (0.0, 1.0, 1.0)\n"
            "assert type(m).__name__ == 'module'\n"
            "assert lazy_module('colorsys') is m and sys.modules['colorsys'] is m\n"
            "import colorsys\n"
            "assert colorsys is m\n"
            "print('ok')\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=False)
    assert result.stdout.strip() == "ok", result.stderr


def test_a_loaded_module_is_returned_as_is() -> None:
    assert lazy_module("sys") is sys


def test_a_missing_module_fails_at_once() -> None:
    with pytest.raises(ModuleNotFoundError):
        lazy_module("ctrd_no_such_module")
