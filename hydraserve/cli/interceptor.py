"""`hydraserve interceptor`: the control plane on Kubernetes, one process per replica of its
Deployment: the placement service (its HTTP API, for `hydraserve plan` and the metrics) and,
on the replica holding the Lease, the interceptor that schedules function pods. Only that
replica's placement state is fed the cluster, so only it answers the placement API (the others
answer 503 ``not_leader`` with Retry-After; their /healthz stays up, so a rollout is not held).

Only wiring: tokens from 0600 files or the environment (a Secret's keys), the API client (the
pod's service account, or --kubeconfig), the model description read from S3 once per function.
SIGTERM stops the interceptor (a cold start under way is abandoned and Knative makes a new pod),
gives the Lease up so another replica leads at once, and drains the API.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import threading

from hydraserve.cli.placement import PLACEMENT_TOKEN_ENV

LOADERD_TOKEN_ENV = "HYDRASERVE_LOADERD_TOKEN"
FUNCTION_NAMESPACES_ENV = "HYDRASERVE_FUNCTION_NAMESPACES"
MODEL_ALLOWLIST_ENV = "HYDRASERVE_MODEL_ALLOWLIST"


def served_namespaces(text: str) -> frozenset[str] | None:
    """The function namespaces from a comma-separated list; None for ``*`` (every namespace:
    then its function rights must be bound cluster-wide)."""
    names = frozenset(n.strip() for n in text.split(",") if n.strip())
    return None if "*" in names else names


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--kubeconfig", help="outside the cluster: the kubeconfig (in a pod: its service account)")
    parser.add_argument("--namespace", default=os.environ.get("POD_NAMESPACE", "hydraserve-system"),
                        help="where the Lease and the loaderd DaemonSet live")
    parser.add_argument("--identity", default=os.environ.get("POD_NAME", socket.gethostname()),
                        help="this replica's name in the Lease")
    parser.add_argument("--lease", default="hydraserve-interceptor", help="the Lease's name")
    parser.add_argument("--host", default="127.0.0.1", help="where the placement API listens")
    parser.add_argument("--port", type=int, default=8090)
    parser.add_argument("--policy", default="ours")
    parser.add_argument("--placement-token-file", help=f"the placement API's token (0600); else {PLACEMENT_TOKEN_ENV}")
    parser.add_argument("--loaderd-token-file", help=f"the loaderd daemons' token (0600); else {LOADERD_TOKEN_ENV}")
    parser.add_argument("--loaderd-port", type=int, default=None, help="where each node's loaderd listens (7070)")
    parser.add_argument("--function-namespaces", type=served_namespaces,
                        default=served_namespaces(os.environ.get(FUNCTION_NAMESPACES_ENV, "default")),
                        help="comma-separated namespaces whose function pods it schedules, where its rights on "
                        f"pods and Secrets are bound; '*' for all (default: {FUNCTION_NAMESPACES_ENV} or 'default')")
    parser.add_argument("--model-allowlist", default=os.environ.get(MODEL_ALLOWLIST_ENV, ""),
                        help="the models each namespace may use: NAMESPACE=s3://bucket/prefix[,...] entries, one per "
                        "line or ';'-separated; a pod naming another is refused with a Warning Event (default: "
                        f"{MODEL_ALLOWLIST_ENV}; unset: any model in any served namespace)")
    parser.add_argument("--endpoint-url", default=os.environ.get("AWS_ENDPOINT_URL"),
                        help="S3 endpoint (default: AWS, or AWS_ENDPOINT_URL)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from kubernetes.client import CoordinationV1Api, CoreV1Api

    from hydraserve.activator.knative.admission import ModelAllowlist
    from hydraserve.activator.knative.interceptor import Interceptor, InterceptorOptions
    from hydraserve.activator.knative.leader import LeaderElection
    from hydraserve.activator.knative.metrics import InterceptorMetrics
    from hydraserve.activator.knative.nodes import LOADERD_PORT, ClusterFeed
    from hydraserve.auth import read_token
    from hydraserve.contracts.function import FunctionConfig
    from hydraserve.contracts.plan import FunctionSpec
    from hydraserve.http_server import DrainingServer
    from hydraserve.logs import configure_logging
    from hydraserve.provider.api import create_app
    from hydraserve.provider.coldstart import ColdStartOptions
    from hydraserve.provider.knative.kube import api_client
    from hydraserve.provider.model_spec import describe_model
    from hydraserve.provider.service import PlacementService
    from hydraserve.weights.model_files import open_model

    configure_logging("interceptor")
    try:
        allowlist = ModelAllowlist.parse(args.model_allowlist)
    except ValueError as exc:
        print(f"hydraserve interceptor: --model-allowlist: {exc}", file=sys.stderr)
        return 2
    placement_token = read_token(args.placement_token_file, PLACEMENT_TOKEN_ENV)
    loaderd_token = read_token(args.loaderd_token_file, LOADERD_TOKEN_ENV)
    service = PlacementService(args.policy)
    client = api_client(args.kubeconfig)
    election = LeaderElection(CoordinationV1Api(client), args.namespace, args.lease, args.identity)
    server = DrainingServer(create_app(service, placement_token, serving=election.leading.is_set),
                            args.host, args.port).start()  # a follower's state is nobody's: 503 until it leads
    core = CoreV1Api(client)
    feed = ClusterFeed(core, service, loaderd_namespace=args.namespace, loaderd_token=loaderd_token,
                       loaderd_port=args.loaderd_port or LOADERD_PORT)

    def describe(function: FunctionConfig) -> FunctionSpec:
        return describe_model(function, open_model(function.model_uri, args.endpoint_url))

    metrics = InterceptorMetrics(service.metrics.registry)  # one GET /metrics for both

    def lead(lost: threading.Event) -> None:
        interceptor = Interceptor(core, service, feed, describe, InterceptorOptions(
            coldstart=ColdStartOptions(s3_endpoint_url=args.endpoint_url), control_namespace=args.namespace,
            namespaces=args.function_namespaces, model_allowlist=allowlist), metrics)
        metrics.leading.set(1)
        watcher = threading.Thread(target=interceptor.run, name="interceptor", daemon=True)
        watcher.start()
        print(json.dumps({"event": "leading", "identity": args.identity}), flush=True)
        lost.wait()
        interceptor.stop()
        metrics.leading.set(0)
        watcher.join(60)

    stop = threading.Event()
    campaign = threading.Thread(target=election.run, args=(lead, stop), name="election", daemon=True)
    campaign.start()
    print(json.dumps({"event": "listening", "url": server.url, "identity": args.identity}), flush=True)
    server.install_signal_handlers()
    while not server.wait_for_stop(1.0):
        pass
    stop.set()
    campaign.join(60)
    server.close()
    return 0
