"""`hydraserve serve`: run one function runtime worker in the foreground.

Flags override the environment (the Knative contract: PORT, K_SERVICE, ...; and HYDRASERVE_*
keys, see runtime/settings.py), so the same entry point serves a container and a laptop.
"""

from __future__ import annotations

import argparse
import os


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="model directory or s3:// URI (else HYDRASERVE_MODEL_URI)")
    parser.add_argument("--port", type=int, help="listen port (else PORT, default 8080)")
    parser.add_argument("--host", help="listen address (default 127.0.0.1; 0.0.0.0 under Knative)")
    parser.add_argument("--endpoint-url", help="S3 endpoint (else HYDRASERVE_S3_ENDPOINT_URL / AWS_ENDPOINT_URL)")
    parser.add_argument("--loaderd-url", help="this node's loaderd (else HYDRASERVE_LOADERD_URL)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--max-batch", type=int, help="concurrent sequences (default 8)")
    parser.add_argument("--max-model-len", type=int)
    parser.add_argument("--name", help="function name reported by the API (else K_SERVICE)")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (else HYDRASERVE_TORCH_THREADS)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from hydraserve.logs import configure_logging
    from hydraserve.runtime.settings import WorkerSettings
    from hydraserve.runtime.worker import run_worker

    overrides = {"HYDRASERVE_MODEL_URI": args.model, "PORT": args.port, "HYDRASERVE_HOST": args.host,
                 "HYDRASERVE_S3_ENDPOINT_URL": args.endpoint_url, "HYDRASERVE_LOADERD_URL": args.loaderd_url,
                 "HYDRASERVE_DTYPE": args.dtype, "HYDRASERVE_MAX_BATCH": args.max_batch,
                 "HYDRASERVE_MAX_MODEL_LEN": args.max_model_len, "K_SERVICE": args.name,
                 "HYDRASERVE_TORCH_THREADS": args.threads}
    env = {**os.environ, **{k: str(v) for k, v in overrides.items() if v is not None}}
    configure_logging("worker")
    return run_worker(WorkerSettings.from_env(env))
