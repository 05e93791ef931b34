"""Cold start side by side in one run, on the embedded stack (moto S3, loaderd, placement, workers):
real vLLM baselines and ours, for HydraServe's comparison and for deciding which engine should
give a function its first token.

Baselines (real vLLM, a worker spawned at the cold start, no loaderd):
- vllm_serverless: the worker downloads the model's files from S3 whole, one stream, to local
  disk, then vLLM's own loader loads them (serverless vLLM);
- vllm_runai_s3: vLLM streams the weights from S3 with Run:ai Model Streamer
  (``load_format=runai_streamer``: ServerlessLLM's kind of loader);
- vllm_cached: the files already in the node's memory (a tmpfs directory), vLLM's own loader.
Ours, vLLM with our load format (loaderd prefetches at placement, tensors used as they land):
- ours: a spawned worker, the bytes from S3;
- ours_warm_node: a spawned worker, the bytes still in the node's loaderd;
- warm_pool: the bytes resident, a pooled vLLM process adopted (runtime/embedded/forkserver.py);
- warm_pool_s3: a pooled process adopted, the bytes from S3;
  these four as a worker starts by default: our compact engine gives the first tokens under
  vLLM's serving layer while vLLM's engine starts (hydraserve.runtime.serving.first_token);
- vllm_first_s3, vllm_first_resident, vllm_first_pool, vllm_first_pool_s3: the same four cells
  with vLLM's engine answering the first token too (``first_token_engine=vllm``);
- ours_warm_node_compiled, warm_pool_compiled: as vllm_first_resident and vllm_first_pool, with
  vLLM's compilation (torch.compile, CPU graph capture) instead of eager mode: item 3's "eager vs
  compiled" (the first repeat compiles from scratch, later ones find vLLM's compile cache).
Beside them the bound: the model's bytes at the store's own throughput (one GET per file, no
cap), next to the start-up that needs no bytes (the warm-node run).

Each mode is a real cold start (placement -> worker -> ready) followed by one streamed request;
TTFT is from the start of the cold start to the first token. Each repeat pushes fresh copies of
the model, so "from S3" modes find nothing in loaderd. Machine CPU utilisation during each run is
reported (2 cores: everything shares them). Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import statistics
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from measure import CpuMeter, store_throughput

from hydraserve.contracts.timeline import Moment


@dataclass(frozen=True)
class Mode:
    """How one cold start is made: the workers' settings (loader, which engine answers first),
    loaderd or not, pooled or spawned, and where its copy of the model is (``copy``: a fresh push,
    or shared with earlier modes)."""

    copy: str  # "plain": no loaderd involved; "a", "b", "e", "f": the repeat's copies (a fresh one is first used from S3)
    settings: dict[str, object] = field(default_factory=dict)
    prefetch: bool = True
    pooled: bool = False
    tmpfs: bool = False


VLLM_FIRST = {"first_token_engine": "vllm"}
MODES: dict[str, Mode] = {
    "vllm_serverless": Mode("plain", {"load_format": "auto", "s3_fetch": "download"}, prefetch=False),
    "vllm_runai_s3": Mode("plain", {"load_format": "runai_streamer"}, prefetch=False),
    "vllm_cached": Mode("plain", {"load_format": "auto"}, prefetch=False, tmpfs=True),
    "ours": Mode("a"),
    "ours_warm_node": Mode("a"),
    "warm_pool": Mode("a", pooled=True),
    "warm_pool_s3": Mode("b", pooled=True),
    "vllm_first_s3": Mode("e", VLLM_FIRST),
    "vllm_first_resident": Mode("e", VLLM_FIRST),
    "vllm_first_pool": Mode("e", VLLM_FIRST, pooled=True),
    "vllm_first_pool_s3": Mode("f", VLLM_FIRST, pooled=True),
    "ours_warm_node_compiled": Mode("a", {"enforce_eager": False, **VLLM_FIRST}),
    "warm_pool_compiled": Mode("a", {"enforce_eager": False, **VLLM_FIRST}, pooled=True),
}
# Item 6's table: the first token, from S3 or resident, spawned or adopted: vLLM alone, and what
# a worker does by default (the compact engine's first token on vLLM's serving layer while vLLM's
# engine starts beside it).
CELLS = ("s3_spawned", "resident_spawned", "resident_adopted", "s3_adopted")
FIRST_TOKEN = {"vllm": dict(zip(CELLS, ("vllm_first_s3", "vllm_first_resident", "vllm_first_pool",
                                        "vllm_first_pool_s3"), strict=True)),
               "compact_then_vllm": dict(zip(CELLS, ("ours", "ours_warm_node", "warm_pool", "warm_pool_s3"),
                                             strict=True))}


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--repeats", type=int, default=3, help="cold starts per mode")
    parser.add_argument("--rate-mbit", type=float, default=400.0,
                        help="cap the S3 server's link with tc (it runs in its own network namespace; "
                        "needs root, else uncapped loopback); 0 = uncapped")
    parser.add_argument("--model-dir", type=Path, default=None,
                        help="a Hugging Face model directory (default: the demo's generated 122 MB Llama)")
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, of {', '.join(MODES)}")
    parser.set_defaults(func=run)


def cold_start(backend: Any, function: Any) -> dict[str, Any]:
    from hydraserve.contracts.timeline import Timeline
    from hydraserve.embedded.demo_client import stream_completion

    cpu, t0 = CpuMeter(), time.time()
    timeline = Timeline()
    timeline.mark(Moment.REQUEST_RECEIVED, component="bench", at=t0)
    endpoint = backend.start(function, timeline)
    ready = time.time()
    result = stream_completion(endpoint.url + "/v1/completions",
                               {"prompt": "The quick brown fox", "max_tokens": 4, "temperature": 0})
    assert result.status == 200 and result.ttft_s is not None, result.error
    ttft = ready - t0 + result.ttft_s
    worker = backend.worker_timeline(endpoint)
    backend.stop(function.name, endpoint.instance_id)
    merged = timeline.merged(worker)
    events = {e.name: e.at - t0 for e in merged.events}
    spawned = merged.first(Moment.WORKER_SPAWNED)
    prefetch = merged.first(Moment.PREFETCH_STARTED)
    return {"ttft_s": round(ttft, 3), "ready_s": round(ready - t0, 3), "cpu_busy": cpu.busy(),
            "adopted": bool(spawned and spawned.detail.get("adopted")),
            "first_token_engine": ready.detail.get("first_token_engine") if (ready := merged.first(Moment.ENGINE_READY)) else None,
            "bytes_new": prefetch.detail.get("bytes_new") if prefetch else None,
            "libraries_imported_s": round(events.get("libraries_imported", 0), 3),
            "weights_loaded_s": round(events["weights_loaded"], 3) if "weights_loaded" in events else None,
            "weights_fetched_s": round(events["weights_fetched"], 3) if "weights_fetched" in events else None}


def run(args: argparse.Namespace) -> int:
    from hydraserve.embedded.stack import LocalStack, StackOptions
    from hydraserve.logs import configure_logging

    modes = [m for m in args.modes.split(",") if m]
    unknown = set(modes) - set(MODES)
    if unknown:
        raise SystemExit(f"unknown mode(s) {', '.join(sorted(unknown))}: of {', '.join(MODES)}")
    configure_logging("bench", "WARNING")
    with contextlib.ExitStack() as exits:
        options = StackOptions(nodes=1, model_dir=args.model_dir, progress=False)
        link_mb_s, notes = None, []
        if args.rate_mbit > 0:
            from hydraserve.embedded.netns import EmulatedCluster, NodeSpec, netns_available

            ok, why = netns_available()
            if ok:
                cluster = exits.enter_context(EmulatedCluster([NodeSpec("s3", rate_mbit=args.rate_mbit)]))
                node = cluster.nodes["s3"]
                options.s3_host, options.s3_prefix, link_mb_s = node.ip, node.prefix, node.link_mb_s
            else:
                notes.append(f"uncapped loopback: {why}")
        stack = exits.enter_context(LocalStack(options))
        return _measure(stack, modes, args, link_mb_s, notes)
    raise AssertionError("unreachable")


def _backend(stack: Any, mode: Mode, run_dir: Path) -> Any:
    from hydraserve.provider.embedded.local import LocalBackend

    pools = stack.backend.launcher.pools if mode.pooled else None
    settings = {**stack.worker_settings, **mode.settings}
    return LocalBackend(stack.placement, stack.nodes, run_dir=run_dir, open_model=stack.open_model,
                        s3_endpoint_url=stack.s3.endpoint_url, worker_env=stack.s3.client_env(),
                        worker_settings=settings, prefetch=mode.prefetch, pools=pools)


def _measure(stack: Any, modes: list[str], args: argparse.Namespace,
             link_mb_s: float | None, notes: list[str]) -> int:
    from hydraserve.contracts.function import FunctionConfig
    from hydraserve.embedded.demo_model import BUCKET
    from hydraserve.runtime.embedded.forkserver_client import pool_memory_gb, wait_until_serving
    from hydraserve.weights.push import push_model

    model_dir = args.model_dir or stack.run_dir / "model"
    pools = stack.backend.launcher.pools
    if not pools:
        raise SystemExit("the node's warm pool did not start (see the stack's log): no pooled modes")
    backends = {mode: _backend(stack, MODES[mode], stack.run_dir / mode) for mode in modes}
    runs: dict[str, list[dict[str, Any]]] = {mode: [] for mode in modes}
    tmpfs = Path("/dev/shm") / f"hydraserve-bench-{uuid.uuid4().hex[:8]}"
    uri = ""
    try:
        for i in range(args.repeats):
            copies: dict[str, str] = {}
            for mode in modes:
                spec = MODES[mode]
                if spec.copy not in copies:  # a fresh copy: nothing of it is in loaderd yet
                    copies[spec.copy] = uri = f"s3://{BUCKET}/bench-{uuid.uuid4().hex[:8]}"
                    push_model(model_dir, uri, progress=False, client=stack.s3.client())
                model_uri = copies[spec.copy]
                if spec.tmpfs:
                    shutil.copytree(model_dir, tmpfs, dirs_exist_ok=True)  # in the node's memory beforehand
                    model_uri = str(tmpfs)
                if spec.pooled:  # refilled since the last adoption
                    wait_until_serving(next(iter(pools.values())), 60)
                print(f"repeat {i + 1}/{args.repeats}: {mode}", flush=True)
                runs[mode].append(cold_start(backends[mode], FunctionConfig(name=f"bench-{mode.replace('_', '-')}-{i}",
                                                                            model_uri=model_uri)))
    finally:
        shutil.rmtree(tmpfs, ignore_errors=True)
    pool_status = wait_until_serving(next(iter(pools.values())), 60)
    idle_memory = pool_status["idle_memory_kb"]
    assert isinstance(idle_memory, list) and idle_memory
    pool_rss_mb = round(statistics.median(m["rss"] for m in idle_memory) / 1024, 1)
    pool_private_mb = round(statistics.median(m["private"] for m in idle_memory) / 1024, 1)
    raw_mb_s, model_bytes = store_throughput(stack.s3.client(), uri)
    median = {mode: statistics.median(r["ttft_s"] for r in rs) for mode, rs in runs.items()}
    fetch_bound = model_bytes / (raw_mb_s * 1e6)
    start_floor = median.get("ours_warm_node")
    bound = max(fetch_bound, start_floor) if start_floor is not None else None
    print(f"\n{'mode':<18} {'TTFT median':>12} {'runs':>30} {'cpu busy':>9}")
    for mode, rs in runs.items():
        print(f"{mode:<18} {median[mode]:>11.2f}s {[r['ttft_s'] for r in rs]!s:>30} "
              f"{statistics.mean(r['cpu_busy'] for r in rs):>9.2f}")
    if bound is not None:
        print(f"{'bound':<18} {bound:>11.2f}s  (fetch {model_bytes / 1e6:.0f} MB at the store's "
              f"{raw_mb_s:.0f} MB/s = {fetch_bound:.2f} s; start-up without fetch {start_floor:.2f} s)")
    first_token = {engine: {cell: median.get(mode) for cell, mode in cells.items()}
                   for engine, cells in FIRST_TOKEN.items()}
    print("\nfirst token (median s)        from S3, spawned  resident, spawned  resident, adopted  from S3, adopted")
    for engine, cells in first_token.items():
        print(f"{engine:<28} " + "  ".join(f"{cells[c] if cells[c] is not None else '-':>16}" for c in CELLS))
    answered_by = sorted({r["first_token_engine"] for r in runs.get("ours", []) if r["first_token_engine"]})
    print(f"one pooled vLLM process: {pool_rss_mb} MB resident ({pool_private_mb} MB its own, the rest shared with "
          f"its fork server); the pool holds {pool_memory_gb(pool_status)} GB of the node's budget")
    print(json.dumps({
        "benchmark": "coldstart", "link_mb_s": link_mb_s, "notes": notes, "model_mb": round(model_bytes / 1e6, 1),
        "store_raw_mb_s": round(raw_mb_s, 1),
        "baseline_ttft_s": median.get("vllm_serverless"), "vllm_serverless_ttft_s": median.get("vllm_serverless"),
        "vllm_runai_s3_ttft_s": median.get("vllm_runai_s3"), "vllm_cached_ttft_s": median.get("vllm_cached"),
        "ours_ttft_s": median.get("ours"), "ours_warm_node_ttft_s": median.get("ours_warm_node"),
        "warm_pool_ttft_s": median.get("warm_pool"), "pool_rss_mb": pool_rss_mb, "pool_private_mb": pool_private_mb,
        "pool_memory_gb": pool_memory_gb(pool_status), "fetch_bound_s": round(fetch_bound, 3),
        "bound_ttft_s": round(bound, 3) if bound is not None else None,
        "speedup_vs_baseline": _ratio(median.get("vllm_serverless"), median.get("ours")),
        "ours_over_bound": _ratio(median.get("ours"), bound),
        "first_token": first_token,  # the engine that gave the first token of a default ("ours") cold start:
        "first_token_engine": answered_by[0] if len(answered_by) == 1 else answered_by or None,
        "eager_vs_compiled_ttft_s": {"ours_warm_node": {"eager": median.get("vllm_first_resident"),
                                                        "compiled": median.get("ours_warm_node_compiled")},
                                     "warm_pool": {"eager": median.get("vllm_first_pool"),
                                                   "compiled": median.get("warm_pool_compiled")}},
        "runs": runs}))
    return 0


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 2) if a is not None and b else None
