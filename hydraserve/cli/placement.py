"""`hydraserve placement`: run the placement service (waitress) until SIGTERM/SIGINT.

Only wiring: optional node file (JSON list of NodeInfo) registered at start, policy by name.
"""

from __future__ import annotations

import argparse
import json

PLACEMENT_TOKEN_ENV = "HYDRASERVE_PLACEMENT_TOKEN"


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8090)
    parser.add_argument("--policy", default="ours", help="ours | hydraserve | hydraserve-cache | "
                        "serverlessllm | serverless-vllm")
    parser.add_argument("--nodes", help="JSON file with a list of NodeInfo to register at start")
    parser.add_argument("--threads", type=int, default=16)
    parser.add_argument("--token-file", help=f"file holding the API token (0600); else {PLACEMENT_TOKEN_ENV}")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from hydraserve.auth import read_token
    from hydraserve.contracts.plan import NodeInfo
    from hydraserve.http_server import DrainingServer
    from hydraserve.logs import configure_logging
    from hydraserve.provider.api import create_app
    from hydraserve.provider.service import PlacementService

    configure_logging("placement")
    token = read_token(args.token_file, PLACEMENT_TOKEN_ENV)
    service = PlacementService(args.policy)
    if args.nodes:
        with open(args.nodes) as f:
            for item in json.load(f):
                service.register_node(NodeInfo.model_validate(item))
    server = DrainingServer(create_app(service, token), args.host, args.port, threads=args.threads).start()
    print(json.dumps({"event": "listening", "url": server.url, "policy": service.policy.name,
                      "nodes": service.cluster.size}), flush=True)
    server.install_signal_handlers()
    while not server.wait_for_stop(1.0):
        pass
    server.close()
    return 0
