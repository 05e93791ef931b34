"""HydraServe's Figure 7, scaled to this machine: cold-start TTFT of five ways to start a function,
side by side in one run on the emulated cluster (each node a network namespace whose link tc
caps both ways; S3 outside every node), several repetitions, medians. Every mode serves with
real vLLM.

- serverless_vllm: p = 1, no prefetch; the worker starts, downloads every weight file whole with
  one stream to local disk, then the engine's own loader loads them (s3_fetch="download");
- serverlessllm: p = 1, no prefetch; the weights streamed from S3 as the worker starts with
  vLLM's ``runai_streamer`` load format (Run:ai Model Streamer, ServerlessLLM's kind of loader);
- serverlessllm_cached: p = 1, the weights already in the node's memory: a tmpfs copy that
  vLLM's own loader reads;
- hydra_1: p = 1, loaderd prefetches at placement, overlapped with the worker's start-up (its
  first token from our compact engine while vLLM's starts, as every whole-model worker);
- hydra: the planner's p (up to 4), prefetch + overlap in every stage, then consolidation.

Beside them: the bound (bytes / (p x link bandwidth)), the start-up floor (the same p workers
with every byte already resident), group vs standalone TPOT (both warm, same stream), the
longest gap between tokens of streams that run through consolidation, when consolidation ends
after the first token, and how many requests in flight were re-prefilled on the standalone
engine. The function's
TTFT SLO is the tightest the planner predicts it can meet (asked with a dry run), so the planner
picks the group size that minimises TTFT, as in the paper's figure. Machine CPU saturation is
reported beside every figure: 2 cores are shared by every emulated node. Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import statistics
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from measure import CpuMeter, store_throughput

from hydraserve.contracts.timeline import Moment

MODES = ["serverless_vllm", "serverlessllm", "serverlessllm_cached", "hydra_1", "hydra"]
PROMPT = "The quick brown fox"

# Llama shapes (fp32). Scaled so that one node's fetch over a 50 Mbit/s link takes 2-4x a
# worker's start-up here (~3 s), as a 7B/13B fetch over 16 Gbps does against a GPU worker's
# start-up in the paper (13 s / 26 s vs ~6 s).
SHAPES: dict[str, dict[str, Any]] = {
    "small": {"arch": "llama", "layers": 4, "hidden": 384, "heads": 6, "kv_heads": 2, "intermediate": 1024,
              "vocab": 8192, "dtype": "float32", "shard_size": "24MB"},
    "large": {"arch": "llama", "layers": 10, "hidden": 512, "heads": 8, "kv_heads": 4, "intermediate": 1408,
              "vocab": 8192, "dtype": "float32", "shard_size": "24MB"},
}


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--repeats", type=int, default=3, help="cold starts per mode and shape")
    parser.add_argument("--nodes", type=int, default=4, help="emulated nodes (the planner may use up to 4)")
    parser.add_argument("--link-mbit", type=float, default=50.0,
                        help="each node's link cap, both ways (needs root); 0: loopback, uncapped")
    parser.add_argument("--shapes", default="small,large", help=f"comma-separated, of {sorted(SHAPES)}")
    parser.add_argument("--model-dir", type=Path, default=None,
                        help="benchmark this Hugging Face model directory instead of the shapes")
    parser.add_argument("--pipeline-size", type=int, default=None, choices=range(1, 5),
                        help="force hydra's group size (default: the planner's choice)")
    parser.add_argument("--tpot-tokens", type=int, default=48, help="tokens of the TPOT streams")
    parser.add_argument("--modes", default=",".join([*MODES, "startup_floor"]),
                        help="comma-separated, of " + ", ".join([*MODES, "startup_floor"]) + " (hydra always runs)")
    parser.set_defaults(func=run)


# ---- one cold start --------------------------------------------------------------------------

def stream(url: str, max_tokens: int, prompt: str | list[int] = PROMPT) -> Any:
    from hydraserve.embedded.demo_client import stream_completion

    result = stream_completion(url + "/v1/completions", {"prompt": prompt, "max_tokens": max_tokens,
                                                         "temperature": 0, "ignore_eos": True})
    assert result.status == 200 and result.ttft_s is not None and result.error is None, result.error
    return result


def longest_stream(url: str) -> int:
    """As many tokens as the model's context allows after the prompt (a few tokens of margin)."""
    import requests

    limit = int(requests.get(url + "/v1/models", timeout=10).json()["data"][0]["max_model_len"])
    return max(8, min(480, limit - 16))


def tpot(result: Any) -> float:
    times = result.token_times
    return (times[-1] - times[0]) / max(1, len(times) - 1)


def cold_start(backend: Any, function: Any, *, tokens: int = 4, through_consolidation: bool = False) -> dict[str, Any]:
    """One cold start and its first request; TTFT from the start of the cold start to the first
    token. ``through_consolidation``: keep streams running until the group consolidated."""
    from hydraserve.contracts.timeline import Timeline

    cpu, t0 = CpuMeter(), time.time()
    timeline = Timeline()
    timeline.mark(Moment.REQUEST_RECEIVED, component="bench", at=t0)
    endpoint = backend.start(function, timeline)
    ready = time.time()
    group = backend.group(endpoint.instance_id)
    consolidates = through_consolidation and group.plan.pipeline_size > 1 and group.plan.stages[0].full
    long = longest_stream(endpoint.url) if consolidates else tokens
    first = stream(endpoint.url, long)
    run: dict[str, Any] = {"ttft_s": round(ready - t0 + (first.ttft_s or 0.0), 3), "ready_s": round(ready - t0, 3),
                           "pipeline_size": group.plan.pipeline_size, "nodes": group.plan.nodes}
    streams = [first]
    if consolidates:
        while not group.consolidated.wait(0):
            streams.append(stream(endpoint.url, long))
        run |= _consolidation(backend, endpoint, first, streams)
    elif tokens > 4:
        run["tpot_s"] = round(tpot(first), 4)
    worker = backend.worker_timeline(endpoint)
    backend.stop(function.name, endpoint.instance_id)
    events = timeline.merged(worker)
    prefetched = [e for e in events.events if e.name == "prefetch_started"]
    run |= {"cpu_busy": cpu.busy(),
            "bytes_new": sum(int(e.detail.get("bytes_new", 0)) for e in prefetched) if prefetched else None}
    return run


def _consolidation(backend: Any, endpoint: Any, first: Any, streams: list[Any]) -> dict[str, Any]:
    """When consolidation ended after the first token, the longest gap between two tokens of a
    stream around it (and the phase it fell before), and how many requests in flight were
    re-prefilled on the standalone engine."""
    timeline = backend.worker_timeline(endpoint)
    switched = timeline.first(Moment.CONSOLIDATED)
    done = timeline.first(Moment.GROUP_CONSOLIDATED) or switched
    assert switched is not None and done is not None
    moved = timeline.first(Moment.HANDOVER_DONE)  # vLLM's hand-over (runtime/serving/handover.py)
    start, end = first.token_times[0], done.at + 1.0
    gaps = [(b - a, b) for s in streams for a, b in zip(s.token_times, s.token_times[1:], strict=False)
            if start <= b <= end]
    longest, at = max(gaps) if gaps else (None, 0.0)
    phases = [(e.name, e.at) for e in timeline.events if e.name in (
        "consolidation_fetch_started", "consolidation_fetched", "standalone_started", "handover_done",
        "consolidated", "group_consolidated")]
    phase = next((f"before {name}" for name, t in phases if at <= t), "after group_consolidated")
    running = next((s for s in streams if s.token_times[0] <= switched.at <= s.token_times[-1]), None)
    return {"consolidated_after_s": round(done.at - start, 3),
            "consolidation_max_gap_s": round(longest, 4) if longest is not None else None,
            "max_gap_phase": phase,
            "handover": "reprefill", "moved": moved.detail.get("moved") if moved else None,
            "context_tokens": len([t for t in running.token_times if t <= switched.at]) if running else None}


# ---- one shape -------------------------------------------------------------------------------

def tightest_slo(stack: Any, function: Any) -> tuple[float, list[dict[str, Any]]]:
    """The smallest TTFT the planner predicts for this function now (dry run), plus 5 %."""
    spec = stack.backend.prepare(function).model_copy(update={"ttft_slo_s": 0.01})
    plan = stack.placement.plan(stack.backend.coldstart.plan_request(spec, dry_run=True))
    feasible = [c for c in plan.candidates if c.feasible and c.predicted_ttft_s is not None]
    best = min(c.predicted_ttft_s for c in feasible)  # type: ignore[type-var]
    return round(best * 1.05, 2), [c.model_dump(include={"pipeline_size", "full_workers", "predicted_ttft_s"})
                                   for c in feasible]


def bench_shape(stack: Any, backends: dict[str, Any], model_dir: Path, args: argparse.Namespace,
                link_mb_s: float | None, name: str) -> dict[str, Any]:
    from hydraserve.contracts.function import FunctionConfig
    from hydraserve.embedded.demo_model import BUCKET
    from hydraserve.weights.push import push_model

    def fresh(tag: str, **config: Any) -> Any:
        """A copy of the model no node holds yet, as a function of its own."""
        unique = f"{name}-{tag}-{uuid.uuid4().hex[:6]}".replace("_", "-").lower()
        uri = f"s3://{BUCKET}/{unique}"
        push_model(model_dir, uri, progress=False, client=stack.s3.client())
        return FunctionConfig(name=unique, model_uri=uri, **config)

    probe = fresh("probe")
    slo, predicted = tightest_slo(stack, probe)
    forced = {"min_pipeline_size": args.pipeline_size, "max_pipeline_size": args.pipeline_size} \
        if args.pipeline_size else {}
    modes = set(args.modes.split(",")) | {"hydra"}
    runs: dict[str, list[dict[str, Any]]] = {m: [] for m in [*MODES, "startup_floor"]}
    slos: list[float] = []
    for i in range(args.repeats):
        def say(mode: str, i: int = i) -> None:
            print(f"{name} repeat {i + 1}/{args.repeats}: {mode}", flush=True)

        for mode, backend in (("serverless_vllm", "download"), ("serverlessllm", "stream"), ("hydra_1", "prefetch")):
            if mode not in modes:
                continue
            say(mode)
            runs[mode].append(cold_start(backends[backend], fresh(mode, max_pipeline_size=1, ttft_slo_s=slo)))
        say("hydra")
        slo, predicted = tightest_slo(stack, probe)  # what the planner believes now (it calibrates as it goes)
        slos.append(slo)
        hydra = fresh("hydra", ttft_slo_s=slo, **forced)
        runs["hydra"].append(cold_start(backends["prefetch"], hydra, through_consolidation=True))
        p = runs["hydra"][-1]["pipeline_size"]
        if "startup_floor" in modes:
            say(f"start-up floor (p = {p}, bytes resident)")
            floor = hydra.model_copy(update={"name": f"{hydra.name}-floor", "min_pipeline_size": p,
                                             "max_pipeline_size": p, "consolidate": False})
            runs["startup_floor"].append(cold_start(backends["prefetch"], floor, tokens=args.tpot_tokens))
        if "serverlessllm_cached" not in modes:
            continue
        say("serverlessllm_cached")
        cached = hydra.model_copy(update={"name": f"{hydra.name}-cached", "max_pipeline_size": 1, "min_pipeline_size": 1})
        with in_node_memory(model_dir) as copy:  # vLLM's own loader from a copy in the node's memory
            runs["serverlessllm_cached"].append(cold_start(backends["cached"], cached.model_copy(
                update={"model_uri": str(copy)}), tokens=args.tpot_tokens))
    return summarise(name, stack, probe, runs, link_mb_s, slos, predicted)


@contextlib.contextmanager
def in_node_memory(model_dir: Path) -> Iterator[Path]:
    """A copy of the model's files in tmpfs (every emulated node shares the host's /dev/shm)."""
    copy = Path("/dev/shm") / f"hydraserve-bench-{uuid.uuid4().hex[:8]}"
    shutil.copytree(model_dir, copy)
    try:
        yield copy
    finally:
        shutil.rmtree(copy, ignore_errors=True)


def median(runs: list[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in runs if r.get(key) is not None]
    return round(statistics.median(values), 4) if values else None


def summarise(name: str, stack: Any, probe: Any, runs: dict[str, list[dict[str, Any]]], link_mb_s: float | None,
              slos: list[float], predicted: list[dict[str, Any]]) -> dict[str, Any]:
    model_bytes = stack.backend.prepare(probe).model_size_bytes
    p = statistics.mode(r["pipeline_size"] for r in runs["hydra"])
    raw_mb_s, _ = store_throughput(stack.s3.client(), probe.model_uri)
    per_node = link_mb_s or raw_mb_s  # loopback: the store is the link
    ttft = {m: median(runs[m], "ttft_s") for m in MODES}
    floor = median(runs["startup_floor"], "ttft_s")
    bound = model_bytes / 1e6 / (p * per_node)
    out = {"shape": name, "model_mb": round(model_bytes / 1e6, 1), "pipeline_size": p, "ttft_s": ttft,
           "bound_s": round(bound, 3), "startup_floor_s": floor,
           "group_tpot_s": median(runs["startup_floor"], "tpot_s"),
           "standalone_tpot_s": median(runs["serverlessllm_cached"], "tpot_s"),
           "consolidation_max_gap_s": median(runs["hydra"], "consolidation_max_gap_s"),
           "consolidated_after_s": median(runs["hydra"], "consolidated_after_s"),
           "kv_handover": {run["handover"]: {k: run[k] for k in ("moved", "consolidation_max_gap_s", "max_gap_phase",
                                                                 "context_tokens")}
                           for run in runs["hydra"][:1] if run.get("handover")},
           "cpu_busy": {m: median(rs, "cpu_busy") for m, rs in runs.items()},
           "floor_bytes_new": median(runs["startup_floor"], "bytes_new"),
           "ttft_slo_s": slos, "planner_candidates": predicted, "store_raw_mb_s": round(raw_mb_s, 1),
           "runs": runs}
    hydra, vllm = ttft["hydra"], ttft["serverless_vllm"]
    if hydra and vllm:
        out["speedup_vs_serverless_vllm"] = round(vllm / hydra, 2)
        out["hydra_over_max_bound_floor"] = round(hydra / max(bound, floor or 0.0), 2)
    if out["group_tpot_s"] and out["standalone_tpot_s"]:
        out["group_over_standalone_tpot"] = round(out["group_tpot_s"] / out["standalone_tpot_s"], 2)
    if out["consolidation_max_gap_s"] and out["standalone_tpot_s"]:
        out["max_gap_over_tpot"] = round(out["consolidation_max_gap_s"] / out["standalone_tpot_s"], 2)
    return out


# ---- the run ---------------------------------------------------------------------------------

def run(args: argparse.Namespace) -> int:
    from hydraserve.embedded.stack import LocalStack, StackOptions
    from hydraserve.logs import configure_logging
    from hydraserve.modeltools.tiny import TinySpec, make_tiny_model

    configure_logging("bench", "WARNING")
    options = StackOptions(nodes=args.nodes, model_dir=args.model_dir, progress=False,
                           link_mbit=args.link_mbit or None, loaderd_budget_bytes=1 << 30,
                           pool_size=0)  # every mode spawns its workers, as the paper's baselines start theirs
    with contextlib.ExitStack() as exits:
        stack = exits.enter_context(LocalStack(options))
        link_mb_s = args.link_mbit / 8 if stack.cluster is not None else None
        print(f"nodes: {stack.emulation}", flush=True)
        backends = {kind: backend_for(stack, kind) for kind in ("download", "stream", "prefetch", "cached")}
        for backend in backends.values():
            exits.callback(backend.close)
        if args.model_dir is not None:
            models = {args.model_dir.name: args.model_dir}
        else:
            models = {name: make_tiny_model(stack.run_dir / f"shape-{name}", TinySpec(**SHAPES[name]))
                      for name in args.shapes.split(",")}
        shapes = [bench_shape(stack, backends, path, args, link_mb_s, name) for name, path in models.items()]
        report(shapes, link_mb_s, stack.emulation)
    return 0


# What each kind of backend changes in the workers' settings.
SETTINGS: dict[str, dict[str, object]] = {"download": {"load_format": "auto", "s3_fetch": "download"},
                                          "stream": {"load_format": "runai_streamer"}, "cached": {"load_format": "auto"}}


def backend_for(stack: Any, kind: str) -> Any:
    """A local backend on the stack's nodes: no prefetch (whole-file download, streamed reads, or
    a copy in memory) for the baselines, loaderd's prefetch for ours. Every worker is spawned at
    the cold start."""
    from hydraserve.provider.embedded.local import LocalBackend

    return LocalBackend(stack.placement, stack.nodes, run_dir=stack.run_dir / kind, open_model=stack.open_model,
                        s3_endpoint_url=stack.s3.endpoint_url, worker_env=stack.s3.client_env(),
                        prefetch=kind == "prefetch", worker_settings={**stack.worker_settings, **SETTINGS.get(kind, {})})


def report(shapes: list[dict[str, Any]], link_mb_s: float | None, emulation: str) -> None:
    print(f"\nvLLM; link {link_mb_s or 'uncapped'} MB/s per node; {emulation}")
    for s in shapes:
        print(f"\n{s['shape']}: {s['model_mb']} MB, hydra p = {s['pipeline_size']} (SLO {s['ttft_slo_s']} s), "
              f"store {s['store_raw_mb_s']} MB/s")
        print(f"  {'mode':<22} {'TTFT median':>11} {'cpu busy':>9}")
        for mode in [*MODES, "startup_floor"]:
            value = s["ttft_s"].get(mode) if mode in MODES else s["startup_floor_s"]
            print(f"  {mode:<22} {value if value is not None else '-':>10}s {s['cpu_busy'].get(mode)!s:>9}")
        print(f"  bound {s['bound_s']} s; group TPOT {s['group_tpot_s']} s vs standalone {s['standalone_tpot_s']} s; "
              f"consolidated {s['consolidated_after_s']} s after the first token, longest gap "
              f"{s['consolidation_max_gap_s']} s; requests moved: {s['kv_handover']}")
    busy = [v for s in shapes for v in s["cpu_busy"].values() if v is not None]
    print(json.dumps({"benchmark": "pipeline", "engine": "vllm", "link_mb_s": link_mb_s, "emulation": emulation, "shapes": shapes,
                      "cpu_busy": round(statistics.mean(busy), 3) if busy else None}))
