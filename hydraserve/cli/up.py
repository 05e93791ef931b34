"""`hydraserve up`: the embedded stack, kept running for a user to curl, until Ctrl-C.

With ``--link-mbit`` the nodes are network namespaces whose links are capped (root; without
root it says so and runs on loopback)."""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from pathlib import Path

from hydraserve.cli.flags import add_setting_flags, given_settings

# The hosted functions' settings `up` takes as flags (their defaults are FunctionConfig's).
UP_FLAGS = ("ttft_slo_s", "tpot_slo_s", "idle_timeout_s", "concurrency", "max_instances", "request_timeout_s")


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--nodes", type=int, default=2, help="emulated GPU nodes, one loaderd each")
    parser.add_argument("--port", type=int, default=8080, help="gateway port")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address every service listens on (default loopback only; 0.0.0.0 exposes the "
                        "gateway, placement, loaderd and S3 to the network)")
    parser.add_argument("--model-dir", type=Path, default=None,
                        help="push this Hugging Face model directory instead of generating one")
    parser.add_argument("--function", action="append", default=[], metavar="NAME[=DIR|URI]",
                        help="a function to host (repeatable): NAME alone names the generated (or --model-dir) "
                        "model's function (default tiny-llama); NAME=DIR pushes that Hugging Face directory; "
                        "NAME=s3://... uses a model already in the embedded S3. More can be added at run time "
                        "with `hydraserve fn create`")
    parser.add_argument("--link-mbit", type=float, default=None,
                        help="emulate the nodes as network namespaces, each link capped at this rate both "
                        "ways (needs root; without it: loopback, said so)")
    add_setting_flags(parser, UP_FLAGS)
    parser.add_argument("--drain-timeout", type=float, default=30.0,
                        help="on Ctrl-C (or fn delete), seconds requests under way get to finish")
    parser.add_argument("--pool-size", type=int, default=1,
                        help="idle pre-imported runtime processes each node's warm pool keeps (a cold start "
                        "adopts one instead of starting a process; 0: no pool)")
    parser.set_defaults(func=run)


def _functions(values: list[str]) -> tuple[str, dict[str, str]]:
    """The main function's name and the others' NAME -> DIR|URI."""
    main = [v for v in values if "=" not in v]
    if len(main) > 1:
        raise SystemExit(f"hydraserve up: one --function NAME without a model, not {len(main)}")
    more = dict(v.split("=", 1) for v in values if "=" in v)
    return (main[0] if main else "tiny-llama"), more


def run(args: argparse.Namespace) -> int:
    from hydraserve.embedded.stack import LocalStack, StackOptions
    from hydraserve.logs import configure_logging
    from hydraserve.processes import check_port_free, raise_open_files_limit

    configure_logging("up")
    function, more = _functions(args.function)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    settings = given_settings(args, UP_FLAGS)
    options = StackOptions(nodes=args.nodes, gateway_port=args.port, host=args.host, model_dir=args.model_dir,
                           function_name=function, more_functions=more, drain_timeout_s=args.drain_timeout,
                           link_mbit=args.link_mbit, pool_size=args.pool_size,
                           idle_timeout_s=settings.pop("idle_timeout_s"), ttft_slo_s=settings.pop("ttft_slo_s"),
                           function=settings)
    try:
        check_port_free(args.host, args.port)
    except OSError as exc:
        print(f"hydraserve up: the gateway port {exc.strerror}: pick another with --port", file=sys.stderr)
        return 2
    raise_open_files_limit()  # a socket per parked request
    with LocalStack(options) as stack:
        fn = stack.function_url()
        admin = f'-H "Authorization: Bearer $(cat {stack.gateway_token_file})"'
        exposed = "" if args.host in ("127.0.0.1", "localhost", "::1") else (
            f"\n  WARNING      listening on {args.host}: the gateway, placement, loaderd and S3 are reachable from "
            "the network (each internal API needs its token; the function routes need none)")
        print(f"""
HydraServe embedded stack is up (Ctrl-C to stop).{exposed}
  gateway      {stack.gateway_url}   (OpenAI API at {stack.gateway_url}/v1, model "{function}")
  admin        {stack.gateway_url}/v1/functions  (token: {stack.gateway_token_file})
  functions    {function}  model {stack.model_uri}  (at zero; scales to zero after {args.idle_timeout_s:g} s idle){"".join(f"; {n}" for n in more)}
  nodes        {" ".join(stack.node_names)} (one loaderd each)
  warm pool    {args.pool_size} idle pre-imported runtime(s) on each of {len(stack.backend.launcher.pools) if stack.backend else 0} node(s)
  network      {stack.emulation}
  loaderd      {" ".join(n.loaderd_url for n in stack.nodes)}  (secret: {stack.run_dir / "loaderd.token"}; each node's token is derived from it, as loaderctl does)
  S3           {stack.s3.endpoint_url}
  placement    {stack.placement.base_url}/v1/cluster  (token: {stack.run_dir / "placement.token"})
  logs         {stack.run_dir}

Try:
  curl -s {stack.gateway_url}/v1/completions -H 'Content-Type: application/json' \\
       -d '{{"model": "{function}", "prompt": "Hello", "max_tokens": 16, "temperature": 0}}'
  curl -N {fn}/v1/chat/completions -H 'Content-Type: application/json' \\
       -d '{{"messages": [{{"role": "user", "content": "Hi"}}], "max_tokens": 16, "stream": true}}'
  curl -s {fn}/ -H 'ce-specversion: 1.0' -H 'ce-type: dev.hydraserve.completion.request' \\
       -H 'ce-source: /curl' -H 'ce-id: 1' -H 'Content-Type: application/json' -d '{{"prompt": "Hi"}}'
  curl -s {stack.gateway_url}/v1/functions/{function}/timeline {admin}
  set -a; . {stack.s3_env_file}; set +a   # the embedded S3's address and keys, then:
  hydraserve model push ./my-model s3://models/my-model --create-bucket
  hydraserve fn create my-model --model s3://models/my-model --gateway {stack.gateway_url} --token-file {stack.gateway_token_file}
  hydraserve fn list --gateway {stack.gateway_url} --token-file {stack.gateway_token_file}
  hydraserve loaderctl --url {stack.nodes[0].loaderd_url} --token-file {stack.run_dir / "loaderd.token"} status
""", flush=True)
        while not stop.wait(1.0):
            pass
        print("stopping...", flush=True)
    return 0
