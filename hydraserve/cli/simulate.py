"""`hydraserve simulate`: trace-driven cold-start simulation over policies, rates and CVs.

Prints a summary table and, last, one JSON object (the first policy/rate/cv's summary at top
level, every row under "rows").
"""

from __future__ import annotations

import argparse
import json


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x]


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--trace", default="synthetic",
                        help="Azure Functions 2021 CSV (app,func,end_timestamp,duration) or 'synthetic' "
                        "(a stand-in of its reported size: 424 functions, 1.98 M invocations in 14 days)")
    parser.add_argument("--workload", choices=("replay", "gamma"), default="replay",
                        help="replay: HydraServe's generator over the trace (Gamma fits per 10-minute "
                        "interval, CV x --cv, 14 days compressed into --duration, sampled to --rate); "
                        "gamma: stationary per-function Gamma processes over Zipf shares")
    parser.add_argument("--rate", default="0.7", help="aggregate req/s; comma list for a sweep")
    parser.add_argument("--cv", default="4", help="coefficient of variation of inter-arrivals; comma list")
    parser.add_argument("--policy", default="ours",
                        help="comma list of: ours, hydraserve, hydraserve-cache, serverlessllm, "
                        "serverless-vllm, or 'all'")
    parser.add_argument("--duration", type=float, default=3600.0, help="simulated seconds")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--copies", type=int, default=64, help="copies of Llama2-7B and of -13B")
    parser.add_argument("--nodes", type=int, default=0,
                        help="0: the paper's testbed (i); N: N homogeneous 4xV100 nodes")
    parser.add_argument("--nic-skew", type=float, default=1.0,
                        help="true/configured NIC bandwidth on the first --skewed-nodes nodes")
    parser.add_argument("--skewed-nodes", type=int, default=0)
    parser.add_argument("--zipf", type=float, default=1.0,
                        help="synthetic popularity skew: share of rank i ~ 1/i^zipf (docs/PLACEMENT.md)")
    parser.add_argument("--applications", action="store_true",
                        help="HydraServe's three applications (chatbot, code, summarization) x --copies")
    parser.add_argument("--plot", help="write attainment vs rate/CV to this PNG (needs matplotlib)")
    parser.add_argument("--json", action="store_true", help="print only the JSON line")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from hydraserve.provider.policies import POLICIES
    from hydraserve.provider.sim.report import build_workload, sweep, table
    from hydraserve.provider.sim.spec import paper_testbed, scale_cluster

    policies = list(POLICIES) if args.policy == "all" else [p for p in args.policy.split(",") if p]
    for p in policies:
        if p not in POLICIES:
            raise SystemExit(f"unknown policy {p!r}; choose from {', '.join(POLICIES)}")
    if args.nodes:
        spec = scale_cluster(args.nodes, 2 * args.copies)
    else:
        spec = paper_testbed(args.copies, args.nic_skew, args.skewed_nodes, applications=args.applications)
    trace = None if args.trace == "synthetic" else args.trace
    try:
        workload = build_workload(args.workload, spec, trace, args.zipf)
    except (OSError, ValueError) as exc:
        raise SystemExit(f"hydraserve simulate: {exc}") from None
    rows = sweep(spec, workload, policies, _floats(args.rate), _floats(args.cv), args.duration, args.seed)
    if not args.json:
        print(table(rows))
    if args.plot:
        from hydraserve.provider.sim.plot import plot_attainment
        plot_attainment(rows, args.plot)
        if not args.json:
            print(f"wrote {args.plot}")
    print(json.dumps({**rows[0], "rows": rows}))
    return 0
