"""`hydraserve serve`: run one function runtime worker in the foreground.

Flags override the environment (the Knative contract: PORT, K_SERVICE, ...; and HYDRASERVE_*
keys, see hydraserve/contracts/worker.py), so the same entry point serves a container and a
laptop. It listens on 127.0.0.1 unless --host (or HYDRASERVE_HOST) says otherwise, under Knative
too (queue-proxy dials 127.0.0.1:$PORT).
"""

from __future__ import annotations

import argparse
import os


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="model directory or s3:// URI (else HYDRASERVE_MODEL_URI)")
    parser.add_argument("--port", type=int, help="listen port (else PORT, default 8080)")
    parser.add_argument("--host", help="listen address (else HYDRASERVE_HOST, default 127.0.0.1)")
    parser.add_argument("--endpoint-url", help="S3 endpoint (else HYDRASERVE_S3_ENDPOINT_URL / AWS_ENDPOINT_URL)")
    parser.add_argument("--loaderd-url", help="this node's loaderd (else HYDRASERVE_LOADERD_URL)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--max-batch", type=int, help="concurrent sequences (default 8)")
    parser.add_argument("--max-model-len", type=int)
    parser.add_argument("--name", help="function name the API reports (else HYDRASERVE_FUNCTION or K_SERVICE)")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (else HYDRASERVE_TORCH_THREADS)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from hydraserve.contracts.worker import ENV_KEYS, WorkerEnvironment
    from hydraserve.logs import configure_logging
    from hydraserve.runtime.worker import run

    flags = {"model_uri": args.model, "port": args.port, "host": args.host, "s3_endpoint_url": args.endpoint_url,
             "loaderd_url": args.loaderd_url, "dtype": args.dtype, "max_batch": args.max_batch,
             "max_model_len": args.max_model_len, "function": args.name, "torch_threads": args.threads}
    env = {**os.environ, **{ENV_KEYS[k]: str(v) for k, v in flags.items() if v is not None}}
    configure_logging("worker")
    return run(WorkerEnvironment.from_env(env))
