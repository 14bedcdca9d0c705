"""The repository's own promises: layout, compose file, generated code."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def test_one_import_package_no_generic_top_level():
    import ctrd.client
    import ctrd.daemon
    import ctrd.shim

    assert Path(ctrd.daemon.__file__).parent == REPO / "daemon"
    assert Path(ctrd.shim.__file__).parent == REPO / "shim"
    assert Path(ctrd.client.__file__).parent == REPO / "client"
    # setup.py maps the folders; none of them may install as a top-level name.
    sys.path.insert(0, str(REPO))
    try:
        from setup import packages  # type: ignore[import-not-found]
    finally:
        sys.path.remove(str(REPO))
    assert all(p == "ctrd" or p.startswith("ctrd.") for p in packages())


def test_generated_code_is_current():
    r = subprocess.run([sys.executable, str(REPO / "scripts" / "genproto.py"), "--check"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


@pytest.mark.skipif(shutil.which("docker-compose") is None, reason="docker-compose not installed")
def test_compose_file_validates():
    r = subprocess.run(["docker-compose", "-f", str(REPO / "docker-compose.test.yml"), "config"],
                       capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0, r.stderr
