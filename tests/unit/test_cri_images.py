"""The CRI image core's filesystem figure: walked at most every USAGE_TTL seconds."""
from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from ctrd.daemon.cri import images


def _images(root: Path) -> images.CRIImages:
    # Only the snapshot folder matters here; the stores are never touched.
    return images.CRIImages(None, None, None, None, None, None, "overlayfs", root)


async def test_usage_is_walked_once_per_ttl(tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "a").write_bytes(b"x" * 10000)
    cri = _images(tmp_path)
    mountpoint, used, inodes = await cri.fs_usage()
    assert mountpoint == str(tmp_path) and used >= 10000 and inodes == 1
    (tmp_path / "b").write_bytes(b"y" * 50000)
    assert await cri.fs_usage() == (mountpoint, used, inodes)  # still the cached walk
    monkeypatch.setattr(images, "USAGE_TTL", 0.0)
    again = await cri.fs_usage()
    assert again[1] >= used + 50000 and again[2] == 2


async def test_concurrent_askers_share_one_walk(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    walks = []
    real = images._usage

    def counting(root: Path) -> tuple[str, int, int]:
        walks.append(root)
        return real(root)

    monkeypatch.setattr(images, "_usage", counting)
    cri = _images(tmp_path)
    results = await asyncio.gather(*(cri.fs_usage() for _ in range(5)))
    assert len(set(results)) == 1 and len(walks) == 1
