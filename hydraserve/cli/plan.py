"""`hydraserve plan`: show the plan for a function and the candidates weighed, without reserving.

Asks a running service (--url, dry run) or plans in-process against a node file, the paper's
testbed (i), or a Kubernetes cluster as the interceptor sees it (--cluster: its nodes, what is
placed on them, what each loaderd holds). Prints the candidates table, the explanation, and last the Plan as JSON.
"""

from __future__ import annotations

import argparse
import json
from typing import TYPE_CHECKING

from hydraserve.cli.flags import add_setting_flags

if TYPE_CHECKING:
    from hydraserve.contracts.plan import FunctionSpec
    from hydraserve.provider.service import PlacementService


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", help="placement service to ask (dry run); default: plan in-process")
    parser.add_argument("--token-file", help="the placement service's token (with --url); "
                        "else HYDRASERVE_PLACEMENT_TOKEN")
    parser.add_argument("--nodes", help="JSON list of NodeInfo; default: testbed (i), 4xV100 + 4xA10")
    parser.add_argument("--cluster", action="store_true", help="the nodes of the Kubernetes cluster (KUBECONFIG, "
                        "--kubeconfig, or the pod's service account); loaderd residency with HYDRASERVE_LOADERD_TOKEN")
    parser.add_argument("--kubeconfig", help="with --cluster: the kubeconfig")
    parser.add_argument("--kube-namespace", default="hydraserve-system", help="with --cluster: loaderd's namespace")
    parser.add_argument("--loaderd-port", type=int, default=7070, help="with --cluster: the daemons' port")
    parser.add_argument("--policy", default="ours")
    parser.add_argument("--function", help="JSON file with a FunctionSpec (overrides the flags below)")
    parser.add_argument("--name", default="llama2-7b")
    parser.add_argument("--model-uri", default="s3://models/llama2-7b")
    parser.add_argument("--size-gb", type=float, default=13.5)
    parser.add_argument("--layers", type=int, default=32)
    add_setting_flags(parser, ("ttft_slo_s", "tpot_slo_s"))
    parser.add_argument("--tpot", type=float, default=None, help="profiled TPOT on one worker (s)")
    parser.add_argument("--prefill", type=float, default=None, help="profiled prefill on one worker (s)")
    parser.add_argument("--json", action="store_true", help="print only the plan JSON")
    parser.set_defaults(func=run)


def _spec(args: argparse.Namespace) -> FunctionSpec:
    from hydraserve.contracts.plan import FunctionSpec

    if args.function:
        with open(args.function) as f:
            return FunctionSpec.model_validate(json.load(f))
    return FunctionSpec(name=args.name, model_uri=args.model_uri, model_size_bytes=int(args.size_gb * 1e9),
                        num_layers=args.layers, ttft_slo_s=args.ttft_slo_s, tpot_slo_s=args.tpot_slo_s,
                        tpot_s=args.tpot, prefill_s=args.prefill)


def run(args: argparse.Namespace) -> int:
    from hydraserve.contracts.plan import NodeInfo, PlanRequest

    request = PlanRequest(function=_spec(args), dry_run=True)
    if args.url:
        from hydraserve.auth import read_token
        from hydraserve.cli.placement import PLACEMENT_TOKEN_ENV
        from hydraserve.provider.client import PlacementClient

        plan = PlacementClient(args.url, read_token(args.token_file, PLACEMENT_TOKEN_ENV)).plan(request)
    else:
        from hydraserve.provider.service import PlacementService
        service = PlacementService(args.policy)
        if args.cluster:
            _feed_cluster(service, args)
        else:
            if args.nodes:
                with open(args.nodes) as f:
                    nodes = [NodeInfo.model_validate(x) for x in json.load(f)]
            else:
                nodes = ([NodeInfo(name=f"v100-{i}", gpus=4, gpu_memory_gb=32) for i in range(4)]
                         + [NodeInfo(name=f"a10-{i}", gpus=1, gpu_memory_gb=24) for i in range(4)])
            for node in nodes:
                service.register_node(node)
        plan = service.plan(request)
    if not args.json:
        print(f"{'p':>2} {'full':>4}  {'TTFT s':>7}  {'TPOT s':>7}  {'ok':>3}  nodes / reason")
        for c in plan.candidates:
            ttft = f"{c.predicted_ttft_s:7.2f}" if c.predicted_ttft_s is not None else "      -"
            tpot = f"{c.predicted_tpot_s:7.3f}" if c.predicted_tpot_s is not None else "      -"
            print(f"{c.pipeline_size:>2} {c.full_workers:>4}  {ttft}  {tpot}  {'yes' if c.meets_slo else 'no':>3}  "
                  f"{','.join(c.nodes) or '-'}: {c.reason}")
        print(plan.explanation)
        for st in plan.stages:
            print(f"  stage {st.stage.index}: layers [{st.stage.layer_start},{st.stage.layer_end}) on {st.node} "
                  f"gpu {st.gpu}, {st.memory_gb} GB{' (full)' if st.full else ''}, fetch "
                  f"{st.fetch_bytes / 1e9:.2f} GB from {st.source} in ~{st.predicted_fetch_s:.2f} s")
    print(plan.model_dump_json())
    return 0


def _feed_cluster(service: PlacementService, args: argparse.Namespace) -> None:
    """Register the cluster's nodes as the interceptor does (activator/knative/nodes.py)."""
    import os

    from kubernetes.client import CoreV1Api

    from hydraserve.activator.knative.nodes import ClusterFeed
    from hydraserve.provider.knative.kube import api_client

    ClusterFeed(CoreV1Api(api_client(args.kubeconfig)), service, loaderd_namespace=args.kube_namespace,
                loaderd_token=os.environ.get("HYDRASERVE_LOADERD_TOKEN", ""), loaderd_port=args.loaderd_port).refresh()
