"""Fixtures shared by integration tests beyond those of tests/conftest.py."""
from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from ctrd.daemon.transfer.pull import Stores
from helpers.stores import temporary_stores


@pytest.fixture
async def stores(tmp_path: Path) -> AsyncIterator[Stores]:
    """In-process content, image and lease stores on a fresh database."""
    async with temporary_stores(tmp_path) as made:
        yield made
