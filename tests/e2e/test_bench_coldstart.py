"""`hydraserve bench coldstart` keeps its output contract (last line one JSON object with the keys
issue 19 names) and its modes really differ in engine, loader and where the bytes came from. A
smoke run of four of its modes: small model, uncapped loopback; the capped-link figures come
from running it by hand (README)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

MODES = "vllm_serverless,ours,warm_pool,vllm_first_pool"  # vllm_cached's tmpfs: tests/e2e/test_bench_pipeline.py


def test_bench_coldstart_smoke(tiny_llama_dir: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "hydraserve.cli", "bench", "coldstart", "--repeats", "1",
                           "--rate-mbit", "0", "--model-dir", str(tiny_llama_dir), "--modes", MODES],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    for key in ("vllm_serverless_ttft_s", "baseline_ttft_s", "ours_ttft_s", "warm_pool_ttft_s", "fetch_bound_s",
                "store_raw_mb_s", "pool_rss_mb", "speedup_vs_baseline"):
        assert result[key] > 0, key
    for key in ("vllm_cached_ttft_s", "vllm_runai_s3_ttft_s", "ours_warm_node_ttft_s", "bound_ttft_s"):
        assert key in result and result[key] is None  # modes not run this time
    assert result["first_token_engine"] == "compact"  # a Llama: the compact engine answers first by default
    first = result["first_token"]
    assert first["compact_then_vllm"]["resident_adopted"] == result["warm_pool_ttft_s"] > 0
    assert first["vllm"]["resident_adopted"] > 0 and set(first) == {"vllm", "compact_then_vllm"}
    runs = result["runs"]
    assert runs["vllm_serverless"][0]["bytes_new"] is None  # no loaderd: the worker downloads the files itself
    assert runs["ours"][0]["bytes_new"] > 0 and runs["warm_pool"][0]["bytes_new"] == 0  # fresh, then resident
    assert [runs[m][0]["adopted"] for m in MODES.split(",")] == [False, False, True, True]
    assert runs["warm_pool"][0]["libraries_imported_s"] < runs["ours"][0]["libraries_imported_s"]
    assert result["eager_vs_compiled_ttft_s"]["warm_pool"] == {"eager": first["vllm"]["resident_adopted"],
                                                               "compiled": None}
    assert [runs[m][0]["first_token_engine"] for m in MODES.split(",")] == ["vllm", "compact", "compact", "vllm"]
