"""`hydraserve bench coldstart` keeps its output contract (last line one JSON object) and its
four modes really differ in where the bytes came from. Small model, uncapped loopback here;
the capped-link figures come from running it by hand (README)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def test_bench_coldstart_smoke(tiny_llama_dir: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "hydraserve.cli", "bench", "coldstart", "--repeats", "1",
                           "--rate-mbit", "0", "--model-dir", str(tiny_llama_dir)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    for key in ("baseline_ttft_s", "ours_ttft_s", "ours_warm_node_ttft_s", "bound_ttft_s", "fetch_bound_s",
                "store_raw_mb_s", "speedup_vs_baseline", "warm_pool_ttft_s", "pool_rss_mb"):
        assert result[key] > 0, key
    runs = result["runs"]
    assert runs["baseline"][0]["weights_fetched_s"] is None, "the baseline must not use loaderd"
    assert runs["ours"][0]["weights_fetched_s"] is not None
    assert runs["ours_warm_node"][0]["weights_fetched_s"] < runs["ours"][0]["weights_fetched_s"], \
        "the warm node should already hold the bytes"
    assert [r["adopted"] for mode in ("baseline", "ours", "ours_warm_node", "warm_pool") for r in runs[mode]] == \
        [False, False, False, True], "only the warm_pool mode adopts a pooled runtime"
    assert runs["warm_pool"][0]["libraries_imported_s"] < runs["ours_warm_node"][0]["libraries_imported_s"]
