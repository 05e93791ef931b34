"""`hydraserve bench gateway` keeps its output contract (last line one JSON object with the keys
the issue names) and answers every request of a small burst through one cold start. The
10,000-request figures come from running it by hand (README)."""

from __future__ import annotations

import json
import subprocess
import sys


def test_bench_gateway_smoke() -> None:
    done = subprocess.run([sys.executable, "-m", "hydraserve.cli", "bench", "gateway", "--requests", "200",
                           "--warm-requests", "100", "--latency-requests", "50"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["benchmark"] == "gateway" and result["answered_by_status"] == {"200": 200}
    assert result["lost"] == 0 and result["cold_starts"] == 1 and result["peak_waiting"] > 0
    for key in ("burst_wall_s", "healthz_p50_ms", "healthz_p99_ms", "kb_per_waiting_request", "warm_rps_gateway",
                "warm_rps_direct", "warm_throughput_ratio", "added_latency_p50_ms", "added_latency_p99_ms",
                "cpu_busy"):
        assert isinstance(result[key], float), key
