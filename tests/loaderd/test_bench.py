"""`hydraserve bench loader` end to end on loopback with a small model: runs, keeps its output
contract (last line one JSON object with the agreed keys). Skipped where s3rver was never
installed (the benchmark npm-installs it on first use; CI does not need that)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

S3RVER = Path(__file__).resolve().parents[2] / "benchmarks" / ".s3rver" / "node_modules" / ".bin" / "s3rver"


@pytest.mark.skipif(not S3RVER.exists(), reason="s3rver not installed (run `hydraserve bench loader` once)")
def test_bench_loader_smoke() -> None:
    done = subprocess.run([sys.executable, "-m", "hydraserve.cli", "bench", "loader", "--no-netns", "--layers", "2",
                           "--hidden", "128", "--vocab", "1024", "--skip-runai"],
                          capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    for key in ("link_mb_s", "loaderd_mb_s", "single_stream_mb_s", "runai_mb_s", "store_raw_mb_s",
                "first_layer_ready_s"):
        assert key in result
    assert result["loaderd_mb_s"] > 0 and result["single_stream_mb_s"] > 0
    assert result["netns"] is False and result["link_mb_s"] is None
    assert 0 < result["first_layer_ready_s"]


def test_bench_loaderd_startup_smoke() -> None:
    """The daemon starts, holds tens of MB, and never maps torch (a byte mover)."""
    done = subprocess.run([sys.executable, "-m", "hydraserve.cli", "bench", "loaderd-startup", "--repeats", "1"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["torch_imported"] is False
    assert 0 < result["startup_s"] < 30 and 0 < result["rss_mb"] < 200
