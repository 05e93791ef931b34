"""Cold start side by side in one run, on the embedded stack (moto S3, loaderd, placement, workers):

- baseline: no prefetch; the worker fetches its weights from S3 itself once it has started
  (what serverless vLLM does; ours still streams tensor by tensor, so this baseline is kind);
- ours: loaderd starts the fetch at placement, overlapped with the worker's start-up;
- ours, warm node: the bytes are already in the node's loaderd (a function scaled to zero and
  back on the same node);
- warm_pool: the same, and the node's warm pool has an idle pre-imported runtime that the cold
  start adopts instead of starting a process (runtime/forkserver.py);
- bound: the model's bytes at the store's own throughput (one GET per file, no cap), next to
  the start-up that needs no bytes at all (the warm-node run).

Each mode is a real cold start (placement -> worker process -> ready) followed by one request;
TTFT is from the start of the cold start to the first streamed token. Machine CPU utilisation
during each run is reported (2 cores: everything shares them). Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time
import uuid
from pathlib import Path
from typing import Any

from measure import CpuMeter, store_throughput


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--repeats", type=int, default=3, help="cold starts per mode")
    parser.add_argument("--rate-mbit", type=float, default=400.0,
                        help="cap the S3 server's link with tc (it runs in its own network namespace; "
                        "needs root, else uncapped loopback); 0 = uncapped")
    parser.add_argument("--model-dir", type=Path, default=None,
                        help="a Hugging Face model directory (default: the demo's generated 122 MB Llama)")
    parser.set_defaults(func=run)


def cold_start(backend: Any, function: Any) -> dict[str, Any]:
    from hydraserve.contracts.timeline import Timeline
    from hydraserve.demo.client import stream_completion

    cpu, t0 = CpuMeter(), time.time()
    timeline = Timeline()
    timeline.mark("request_received", component="bench", at=t0)
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
    spawned = merged.first("worker_spawned")
    return {"ttft_s": round(ttft, 3), "ready_s": round(ready - t0, 3), "cpu_busy": cpu.busy(),
            "adopted": bool(spawned and spawned.detail.get("adopted")),
            "libraries_imported_s": round(events.get("libraries_imported", 0), 3),
            "weights_loaded_s": round(events.get("weights_loaded", 0), 3),
            "weights_fetched_s": round(events["weights_fetched"], 3) if "weights_fetched" in events else None}


def run(args: argparse.Namespace) -> int:
    from hydraserve.demo.stack import LocalStack, StackOptions
    from hydraserve.logs import configure_logging

    configure_logging("bench", "WARNING")
    with contextlib.ExitStack() as exits:
        options = StackOptions(nodes=1, model_dir=args.model_dir, progress=False,
                               engine="compact")  # vLLM's baselines: to do (issue 19, item 7)
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
        return _measure(stack, args, link_mb_s, notes)
    raise AssertionError("unreachable")


def _measure(stack: Any, args: argparse.Namespace, link_mb_s: float | None, notes: list[str]) -> int:
    from hydraserve.activator.functions import FunctionConfig
    from hydraserve.demo.model import BUCKET
    from hydraserve.provider.backends.local import LocalBackend
    from hydraserve.runtime.forkserver_client import pool_memory_gb, wait_until_serving
    from hydraserve.weights.push import push_model

    model_dir = args.model_dir or stack.run_dir / "model"
    pools = stack.backend.launcher.pools
    if not pools:
        raise SystemExit("the node's warm pool did not start (see the stack's log): no warm_pool mode")
    backends = {mode: LocalBackend(stack.placement, stack.nodes, run_dir=stack.run_dir / mode,
                                   describe_model=stack.describe_model,
                                   s3_endpoint_url=stack.s3.endpoint_url, worker_env=stack.s3.client_env(),
                                   worker_settings=stack.worker_settings,
                                   prefetch=mode != "baseline", pools=pools if mode == "warm_pool" else None)
                for mode in ("baseline", "ours", "warm_pool")}
    runs: dict[str, list[dict[str, Any]]] = {"baseline": [], "ours": [], "ours_warm_node": [], "warm_pool": []}
    for i in range(args.repeats):
        # A fresh copy per repeat: nothing of it is on the node yet.
        uri = f"s3://{BUCKET}/bench-{uuid.uuid4().hex[:8]}"
        push_model(model_dir, uri, progress=False, client=stack.s3.client())
        fn = FunctionConfig(name=f"bench-{i}", model_uri=uri)
        print(f"repeat {i + 1}/{args.repeats}: baseline", flush=True)
        runs["baseline"].append(cold_start(backends["baseline"], fn))
        print(f"repeat {i + 1}/{args.repeats}: ours", flush=True)
        runs["ours"].append(cold_start(backends["ours"], fn))
        print(f"repeat {i + 1}/{args.repeats}: ours, warm node", flush=True)
        runs["ours_warm_node"].append(cold_start(backends["ours"], fn))
        print(f"repeat {i + 1}/{args.repeats}: warm pool (bytes resident, a pooled runtime adopted)", flush=True)
        wait_until_serving(next(iter(pools.values())), 30)  # refilled since the last adoption
        runs["warm_pool"].append(cold_start(backends["warm_pool"], fn))
    pool_status = wait_until_serving(next(iter(pools.values())), 30)
    idle_memory = pool_status["idle_memory_kb"]
    assert isinstance(idle_memory, list) and idle_memory
    pool_rss_mb = round(statistics.median(m["rss"] for m in idle_memory) / 1024, 1)
    pool_private_mb = round(statistics.median(m["private"] for m in idle_memory) / 1024, 1)
    raw_mb_s, model_bytes = store_throughput(stack.s3.client(), uri)
    median = {mode: statistics.median(r["ttft_s"] for r in rs) for mode, rs in runs.items()}
    fetch_bound = model_bytes / (raw_mb_s * 1e6)
    bound = max(fetch_bound, median["ours_warm_node"])  # neither the bytes nor the start-up can be skipped
    print(f"\n{'mode':<16} {'TTFT median':>12} {'runs':>24} {'cpu busy':>9}")
    for mode, rs in runs.items():
        print(f"{mode:<16} {median[mode]:>11.2f}s {[r['ttft_s'] for r in rs]!s:>24} "
              f"{statistics.mean(r['cpu_busy'] for r in rs):>9.2f}")
    print(f"{'bound':<16} {bound:>11.2f}s  (fetch {model_bytes / 1e6:.0f} MB at the store's "
          f"{raw_mb_s:.0f} MB/s = {fetch_bound:.2f} s; start-up without fetch {median['ours_warm_node']:.2f} s)")
    print(f"one pooled runtime: {pool_rss_mb} MB resident ({pool_private_mb} MB its own, the rest shared with its "
          f"fork server); the pool holds {pool_memory_gb(pool_status)} GB of the node's budget")
    print(json.dumps({"benchmark": "coldstart", "link_mb_s": link_mb_s, "notes": notes,
                      "model_mb": round(model_bytes / 1e6, 1),
                      "store_raw_mb_s": round(raw_mb_s, 1), "baseline_ttft_s": median["baseline"],
                      "ours_ttft_s": median["ours"], "ours_warm_node_ttft_s": median["ours_warm_node"],
                      "warm_pool_ttft_s": median["warm_pool"], "pool_rss_mb": pool_rss_mb,
                      "pool_private_mb": pool_private_mb, "pool_memory_gb": pool_memory_gb(pool_status),
                      "fetch_bound_s": round(fetch_bound, 3), "bound_ttft_s": round(bound, 3),
                      "speedup_vs_baseline": round(median["baseline"] / median["ours"], 2),
                      "ours_over_bound": round(median["ours"] / bound, 2), "runs": runs}))
    return 0
