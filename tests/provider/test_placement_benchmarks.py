"""The placement benchmarks run end to end on tiny settings and end with their JSON line
(their figures are in docs/PLACEMENT.md; this only keeps the scripts from rotting)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def run(script: str, *args: str) -> dict:
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args], capture_output=True,
                         text=True, timeout=300, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def test_attainment_benchmark_small_run() -> None:
    result = run("placement_attainment.py", "--seeds", "1", "--rates", "0.3", "--cvs", "2", "--duration", "600")
    assert result["workload"] == "replay" and result["trace"] == "synthetic"
    policies = {r["policy"] for r in result["rows"]}
    assert policies == {"serverless-vllm", "serverlessllm", "hydraserve", "hydraserve-cache", "ours"}
    assert all(0.0 <= r["slo_attainment"] <= 1.0 for r in result["rows"])


def test_scale_benchmark_small_run() -> None:
    result = run("placement_scale.py", "--nodes", "20", "--rate", "2", "--duration", "300", "--functions", "40",
                 "--trials", "20")
    assert result["sim_requests"] == 600 and result["decision_median_ms"] > 0


def test_keepalive_benchmark_small_run() -> None:
    result = run("keepalive_sim.py", "--seeds", "1", "--rate", "0.3", "--cvs", "2", "--duration", "600")
    assert {r["mode"] for r in result["rows"]} == {"fixed", "histogram", "histogram-scaled"}
    fixed = next(r for r in result["rows"] if r["mode"] == "fixed")
    assert fixed["prewarms"] == 0 and all(0.0 <= r["slo_attainment"] <= 1.0 for r in result["rows"])
    assert all(r["prefetched_unused_gb"] <= r["prefetched_gb"] for r in result["rows"])
