"""The benchmark's smoke mode keeps working; its numbers are never asserted."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.integration
def test_bench_smoke_runs_and_writes_json(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    result = subprocess.run([sys.executable, "-m", "bench", "--smoke", "--json", str(out)],
                            cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-5000:]
    body = json.loads(out.read_text())
    assert body["settings"]["smoke"] is True
    assert body["machine"]["cpus"] >= 1
    rows = body["rows"]
    assert rows and all(row["status"] in ("ok", "unavailable", "skipped", "error")
                        for row in rows)
    # Every row is either measured on containerd or says why not.
    for row in rows:
        assert row["containerd"]["samples"] or row["reason"], row
    assert "ctrd/containerd" in result.stdout
