"""Scale of the placement code: one decision at N nodes, and an hour of trace at R req/s.

Targets (issue 4): a decision at 1000 nodes under 1 ms; a 1000-node cluster with one hour of
trace at 100 req/s simulated in under 60 s. Prints a table, then one JSON line last.
Run: python benchmarks/placement_scale.py [--nodes 1000] [--rate 100] [--duration 3600]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time


def decision_latency(nodes: int, policy: str, trials: int) -> dict[str, float]:
    """Median and p99 of PlacementService.plan with a partly loaded cluster (dry runs)."""
    from hydraserve.contracts.plan import NodeInfo, PlanRequest
    from hydraserve.errors import OverloadedError
    from hydraserve.provider.service import PlacementService
    from hydraserve.provider.sim.spec import LLAMA2_7B, LLAMA2_13B, function_spec

    svc = PlacementService(policy, clock=lambda: 0.0)
    for i in range(nodes):
        svc.register_node(NodeInfo(name=f"n{i}", gpus=4, gpu_memory_gb=32, nic_gbps=16), now=0.0)
    fns = [function_spec(LLAMA2_7B if i % 2 else LLAMA2_13B, i) for i in range(200)]
    for i in range(nodes // 2):  # load: half as many running instances as nodes, fetches in flight
        try:
            svc.plan(PlanRequest(function=fns[i % len(fns)]), now=i * 0.1)
        except OverloadedError:
            break
    times, refused = [], 0
    for i in range(trials):
        req = PlanRequest(function=fns[i % len(fns)], dry_run=True)
        t = time.perf_counter()
        try:
            svc.plan(req, now=nodes * 0.05 + 1.0)
        except OverloadedError:  # a refusal (no memory or NIC headroom) is a decision too
            refused += 1
        times.append(time.perf_counter() - t)
    times.sort()
    return {"decision_median_ms": 1000 * statistics.median(times),
            "decision_p99_ms": 1000 * times[int(0.99 * (len(times) - 1))], "decisions_refused": refused}


def simulation(nodes: int, rate: float, duration: float, functions: int, policy: str,
               workload: str) -> dict[str, float]:
    from hydraserve.provider.sim.engine import Simulator, summarize
    from hydraserve.provider.sim.replay import ReplayWorkload, synthetic_trace
    from hydraserve.provider.sim.spec import scale_cluster
    from hydraserve.provider.sim.workload import gamma_arrivals, zipf_popularity

    spec = scale_cluster(nodes, functions)
    t = time.perf_counter()
    if workload == "replay":  # a stand-in trace with 2 trace functions per LLM function, 5k invocations each
        trace = synthetic_trace(n_functions=2 * functions, invocations=5000 * functions, seed=1)
        arrivals = ReplayWorkload.from_trace(trace, functions)(rate, 4.0, duration, 1)
    else:
        arrivals = gamma_arrivals(zipf_popularity(functions), rate, 4.0, duration, seed=1)
    generated = time.perf_counter() - t
    t = time.perf_counter()
    result = Simulator(spec, policy, arrivals).run()
    wall = time.perf_counter() - t
    s = summarize(result, spec.functions)
    return {"sim_wall_s": wall, "arrivals_wall_s": generated, "sim_requests": s["requests"],
            "sim_cold_starts": s["cold_starts"],
            "sim_slo_attainment": s["slo_attainment"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nodes", type=int, default=1000)
    ap.add_argument("--rate", type=float, default=100.0)
    ap.add_argument("--duration", type=float, default=3600.0)
    ap.add_argument("--functions", type=int, default=2000)
    ap.add_argument("--policy", default="ours")
    ap.add_argument("--trials", type=int, default=500)
    ap.add_argument("--workload", choices=("replay", "gamma"), default="replay",
                    help="replay: HydraServe's generator over a stand-in trace (CV x 4); gamma: stationary, CV 4")
    args = ap.parse_args()
    out = {"nodes": args.nodes, "policy": args.policy, **decision_latency(args.nodes, args.policy, args.trials)}
    print(f"decision at {args.nodes} nodes: median {out['decision_median_ms']:.3f} ms, "
          f"p99 {out['decision_p99_ms']:.3f} ms", flush=True)
    out.update(simulation(args.nodes, args.rate, args.duration, args.functions, args.policy, args.workload))
    out.update({"rate": args.rate, "duration_s": args.duration, "functions": args.functions,
                "workload": args.workload})
    print(f"simulated {args.duration:.0f} s at {args.rate} req/s on {args.nodes} nodes "
          f"({out['sim_requests']} requests, {out['sim_cold_starts']} cold starts) in {out['sim_wall_s']:.1f} s "
          f"(+ {out['arrivals_wall_s']:.1f} s generating the {args.workload} arrivals)")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
