"""`hydraserve bench pipeline` keeps its output contract (last line one JSON object with the keys
the issue names) and its modes really differ in where the bytes came from and in the group
they ran. A smoke run on vLLM (the default engine): the tiny model, one repeat, loopback
(uncapped), a forced group of 2; the capped-link figures, and the compact engine's
(``--engine compact``), come from running it by hand (README)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

MODES = {"serverlessllm", "serverlessllm_cached", "hydra"}  # hydra_1 (hydra at p = 1) and serverless_vllm spared:
# the latter's whole-file download runs in tests/e2e/test_bench_coldstart.py


def test_bench_pipeline_smoke(tiny_llama_dir: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "hydraserve.cli", "bench", "pipeline", "--repeats", "1",
                           "--link-mbit", "0", "--nodes", "2", "--pipeline-size", "2", "--tpot-tokens", "8",
                           "--model-dir", str(tiny_llama_dir),
                           "--modes", ",".join([*MODES, "startup_floor"])], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["benchmark"] == "pipeline" and result["engine"] == "vllm" and result["link_mb_s"] is None
    assert 0 < result["cpu_busy"] <= 1
    (shape,) = result["shapes"]
    for key in ("shape", "model_mb", "pipeline_size", "ttft_s", "bound_s", "startup_floor_s", "group_tpot_s",
                "standalone_tpot_s", "consolidation_max_gap_s", "consolidated_after_s"):
        assert shape[key] is not None, key
    assert all(shape["ttft_s"][m] > 0 for m in MODES) and shape["ttft_s"]["hydra_1"] is None
    assert shape["ttft_s"]["serverless_vllm"] is None
    runs = shape["runs"]
    for baseline in ("serverlessllm", "serverlessllm_cached"):  # vLLM's own loaders, no loaderd
        assert runs[baseline][0]["bytes_new"] is None, baseline
    assert runs["hydra"][0]["bytes_new"] > 0  # a fresh copy, prefetched
    assert runs["startup_floor"][0]["bytes_new"] == 0
    assert [r["pipeline_size"] for m in ("serverlessllm", "serverlessllm_cached") for r in runs[m]] == [1, 1]
    assert shape["pipeline_size"] == 2 and runs["startup_floor"][0]["pipeline_size"] == 2
    assert set(shape["kv_handover"]) == {"reprefill"}  # vLLM's hand-over: requests in flight re-prefilled
    assert runs["hydra"][0]["moved"] is not None  # the hand-over happened, counting the requests it moved
