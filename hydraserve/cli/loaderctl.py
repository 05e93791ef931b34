"""`hydraserve loaderctl`: talk to a running loaderd from a shell.

Operators warm a node before a launch (`prefetch --wait` shows a live progress bar and ends
with one JSON line), see what a node holds (`status`), and drop a pin early (`release`).
Only parses arguments and formats output; the work is the daemon's, through LoaderClient.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from hydraserve.auth import node_admin_token, read_token
from hydraserve.cli.loaderd import LOADERD_TOKEN_ENV
from hydraserve.contracts.loader import LeaseResponse, LoaderStatus, PrefetchRequest
from hydraserve.loaderd.client import LoaderClient

POLL_S = 0.2


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", default=os.environ.get("HYDRASERVE_LOADERD_URL", "http://127.0.0.1:7070"),
                        help="the daemon (default HYDRASERVE_LOADERD_URL or http://127.0.0.1:7070)")
    parser.add_argument("--token-file", help="file holding the install's loaderd secret (0600; the node's "
                        "admin token is derived from it); else HYDRASERVE_LOADERD_TOKEN")
    parser.add_argument("--node", help="on Kubernetes: the daemon of this node (found through the API: "
                        "the DaemonSet's pod there; run inside the cluster, e.g. kubectl exec into the control plane)")
    parser.add_argument("--kubeconfig", help="with --node, outside a pod: the kubeconfig (default KUBECONFIG)")
    parser.add_argument("--kube-namespace", default="hydraserve-system", help="with --node: the DaemonSet's namespace")
    parser.add_argument("--port", type=int, default=7070, help="with --node: the daemons' port")
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)

    prefetch = sub.add_parser("prefetch", help="start fetching a whole model into the node's shared memory")
    prefetch.add_argument("model_uri", help="s3://bucket/prefix of a Hugging Face model directory")
    prefetch.add_argument("--endpoint-url", default=None, help="S3 endpoint (default: the daemon's)")
    prefetch.add_argument("--pin-s", type=float, default=300.0, help="keep it from eviction this long")
    prefetch.add_argument("--wait", action="store_true", help="show progress until every byte landed")
    prefetch.add_argument("--timeout-s", type=float, default=3600.0, help="give up waiting after this long")
    prefetch.set_defaults(func=run_prefetch)

    status = sub.add_parser("status", help="budget, models held and segments")
    status.add_argument("--json", action="store_true", help="the raw /v1/status body")
    status.set_defaults(func=run_status)

    release = sub.add_parser("release", help="drop a lease (a prefetch's pin or an attach)")
    release.add_argument("lease_id")
    release.set_defaults(func=run_release)


def _client(args: argparse.Namespace) -> LoaderClient:
    """The daemon with its node's admin token (the node: --node, else what the daemon's
    /healthz says, asked without a token)."""
    url = _url(args)
    node = args.node or LoaderClient(url, "").node_name()
    return LoaderClient(url, node_admin_token(read_token(args.token_file, LOADERD_TOKEN_ENV), node))


def _url(args: argparse.Namespace) -> str:
    if not args.node:
        return str(args.url)
    from kubernetes.client import CoreV1Api

    from hydraserve.errors import NotFoundError
    from hydraserve.provider.knative.kube import api_client, daemon_urls

    urls = daemon_urls(CoreV1Api(api_client(args.kubeconfig)), args.kube_namespace, port=args.port)
    if args.node not in urls:
        raise NotFoundError(f"no loaderd running on node {args.node!r} (nodes with one: {', '.join(sorted(urls)) or 'none'})")
    return urls[args.node]


def _lease_progress(lease: LeaseResponse, status: LoaderStatus) -> tuple[int, list[str]]:
    """Bytes of the lease's segments that are ready, and the groups that failed."""
    mine = {s.segment_id for s in lease.segments}
    segments = [s for s in status.segments if s.segment_id in mine]
    return sum(s.bytes_ready for s in segments), [s.group for s in segments if s.state == "failed"]


def run_prefetch(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    client = _client(args)
    started = time.monotonic()
    lease = client.prefetch(PrefetchRequest(model_uri=args.model_uri, endpoint_url=args.endpoint_url,
                                            pin_s=args.pin_s))
    summary = {"lease_id": lease.lease_id, "model_key": lease.model_key, "bytes_total": lease.bytes_total,
               "bytes_new": lease.bytes_new, "segments": len(lease.segments)}
    if not args.wait:
        print(json.dumps(summary))
        return 0
    failed: list[str] = []
    done = 0
    with tqdm(total=lease.bytes_total, unit="B", unit_scale=True, unit_divisor=1024, desc="prefetch",
              file=sys.stderr, disable=None) as bar:
        while time.monotonic() - started < args.timeout_s:
            done, failed = _lease_progress(lease, client.status())
            bar.update(done - bar.n)
            if failed or done >= lease.bytes_total:
                break
            time.sleep(POLL_S)
    seconds = time.monotonic() - started
    summary.update(bytes_ready=done, seconds=round(seconds, 3),
                   mb_s=round(lease.bytes_new / seconds / 1e6, 1) if lease.bytes_new else None)
    if failed:
        summary["failed_groups"] = failed
        print(f"prefetch failed in {len(failed)} segment(s) {failed[:5]}; the daemon's log says why",
              file=sys.stderr)
    elif done < lease.bytes_total:
        print(f"gave up waiting after {args.timeout_s:.0f} s; the fetch goes on", file=sys.stderr)
    print(json.dumps(summary))
    return 0 if done >= lease.bytes_total and not failed else 1


def run_status(args: argparse.Namespace) -> int:
    status = _client(args).status()
    if args.json:
        print(status.model_dump_json(indent=2))
        return 0
    print(f"node {status.node_name}: {human(status.used_bytes)} of {human(status.budget_bytes)} used, "
          f"{human(status.pinned_bytes)} pinned, {status.inflight_chunks} chunks in flight")
    print(f"{'model':48} {'complete':>10} {'filling':>10} {'of model':>10}")
    for m in status.models:
        print(f"{m.model_uri[:48]:48} {human(m.bytes_complete):>10} {human(m.bytes_filling):>10} "
              f"{human(m.model_bytes):>10}")
    states: dict[str, int] = {}
    for s in status.segments:
        states[s.state] = states.get(s.state, 0) + 1
    print("segments: " + (", ".join(f"{n} {state}" for state, n in sorted(states.items())) or "none"))
    return 0


def human(n: int) -> str:
    """Bytes for people: 612.0 KB, 13.5 GB (decimal units, like the benchmarks' MB/s)."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def run_release(args: argparse.Namespace) -> int:
    print(json.dumps(_client(args).release(args.lease_id).model_dump()))
    return 0
