"""`hydraserve loaderd`: run one node's loader daemon until SIGTERM/SIGINT (then unlink its
segments). Only reads settings and wires hydraserve.loaderd.daemon."""

from __future__ import annotations

import argparse

from hydraserve.auth import read_token
from hydraserve.loaderd.models import DEFAULT_REVALIDATE_S
from hydraserve.weights.fetch import DEFAULT_CHUNK_BYTES, DEFAULT_CONCURRENCY, DEFAULT_MIN_CHUNK_BYTES
from hydraserve.weights.retry import DEFAULT_BUDGET_S

LOADERD_TOKEN_ENV = "HYDRASERVE_LOADERD_TOKEN"


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default loopback)")
    parser.add_argument("--port", type=int, default=7070)
    parser.add_argument("--token-file", help="file holding the install's loaderd secret (0600; the daemon "
                        "answers its node's admin token derived from it); else HYDRASERVE_LOADERD_TOKEN")
    parser.add_argument("--budget-bytes", type=int, required=True,
                        help="node-wide shared-memory budget (segments are evicted LRU under it)")
    parser.add_argument("--node-name", required=True, help="names this node's segments in /dev/shm and "
                        "keys its tokens (hydraserve.auth.NodeKeys)")
    parser.add_argument("--allow-endpoint-url", action="append", default=[],
                        help="another S3 endpoint requests may name (repeatable; the default one always may)")
    parser.add_argument("--endpoint-url", default=None,
                        help="S3 endpoint (default: AWS_ENDPOINT_URL or AWS)")
    parser.add_argument("--concurrency", type=int, default=DEFAULT_CONCURRENCY,
                        help="ranged GETs in flight")
    parser.add_argument("--chunk-bytes", type=int, default=DEFAULT_CHUNK_BYTES,
                        help="largest ranged GET (a layer group is striped over all streams)")
    parser.add_argument("--min-chunk-bytes", type=int, default=DEFAULT_MIN_CHUNK_BYTES,
                        help="smallest ranged GET when striping a group")
    parser.add_argument("--retry-budget-s", type=float, default=DEFAULT_BUDGET_S,
                        help="how long one S3 request keeps retrying before it fails (a dead S3 fails "
                             "a cold start in about this long)")
    parser.add_argument("--revalidate-s", type=float, default=DEFAULT_REVALIDATE_S,
                        help="recheck a resolved model version (one HEAD of its manifest) at most this often")
    parser.add_argument("--strict-integrity", action="store_true",
                        help="publish tensors of whole files only after their sha256 matched")
    parser.add_argument("--no-etag-check", dest="etag_check", action="store_false",
                        help="do not check files of models pushed without a manifest against their S3 "
                             "ETags (needed when the bucket uses SSE-KMS/SSE-C: those ETags are not MD5s)")
    parser.add_argument("--shm-dir", default="/dev/shm")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from hydraserve.loaderd.daemon import LoaderDaemon
    from hydraserve.loaderd.service import LoaderConfig
    from hydraserve.logs import configure_logging

    configure_logging("loaderd")
    import logging

    log = logging.getLogger("hydraserve.loaderd")
    config = LoaderConfig(node_name=args.node_name, budget_bytes=args.budget_bytes,
                          concurrency=args.concurrency, chunk_bytes=args.chunk_bytes,
                          min_chunk_bytes=args.min_chunk_bytes,
                          retry_budget_s=args.retry_budget_s, revalidate_s=args.revalidate_s, shm_dir=args.shm_dir,
                          endpoint_url=args.endpoint_url, allowed_endpoint_urls=tuple(args.allow_endpoint_url),
                          strict_integrity=args.strict_integrity,
                          etag_check=args.etag_check)
    daemon = LoaderDaemon(config, read_token(args.token_file, LOADERD_TOKEN_ENV), host=args.host, port=args.port).start()
    log.info("loaderd listening", extra={"url": daemon.url, "node": args.node_name,
                                         "budget_bytes": args.budget_bytes})
    daemon.server.install_signal_handlers()
    try:
        while not daemon.server.wait_for_stop(1.0):
            pass
    finally:
        daemon.stop()
        log.info("loaderd stopped; segments unlinked")
    return 0
