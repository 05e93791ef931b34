"""`hydraserve fn`: create, list, describe and delete functions on a running gateway (its admin
API, with its token). The verbs and flags are the ones `kn hydra` uses on Knative, so users
learn one vocabulary: ``fn create NAME --model s3://... --ttft-slo 7.5s --tpot-slo 200ms``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
from typing import Any

GATEWAY_ENV = "HYDRASERVE_GATEWAY"
TOKEN_ENV = "HYDRASERVE_GATEWAY_TOKEN"
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_UNIT_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


def duration_s(text: str) -> float:
    """'7.5s', '200ms', '2m' or a bare number of seconds, as seconds."""
    match = _DURATION.match(text)
    if not match:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration (e.g. 7.5s, 200ms, 2m)")
    return float(match.group(1)) * _UNIT_S[match.group(2)]


def add_function_flags(create: argparse.ArgumentParser) -> None:
    """The flags `fn create` and `kn hydra create` share (one vocabulary); each is None unless
    given, so the platform's defaults apply."""
    create.add_argument("name", help="function name: lowercase letters, digits, '-' (also its OpenAI model name)")
    create.add_argument("--model", required=True, help="the model: s3://bucket/prefix of a Hugging Face directory")
    create.add_argument("--ttft-slo", type=duration_s, default=None, help="time-to-first-token target, e.g. 7.5s")
    create.add_argument("--tpot-slo", type=duration_s, default=None, help="time-per-output-token target, e.g. 200ms")
    create.add_argument("--concurrency", type=int, default=None,
                        help="requests one instance serves at once (0: no limit)")
    create.add_argument("--max-instances", type=int, default=None, help="instances it scales out to")
    create.add_argument("--group-replicas", type=int, default=None,
                        help="standalone replicas a consolidated pipeline group becomes at least (default 1)")


def configure(parser: argparse.ArgumentParser) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--gateway", default=os.environ.get(GATEWAY_ENV, "http://127.0.0.1:8080"),
                        help=f"the gateway's URL (default ${GATEWAY_ENV} or http://127.0.0.1:8080)")
    common.add_argument("--token-file", default=None,
                        help=f"file holding the gateway's admin token (`up` prints it); else ${TOKEN_ENV}")
    sub = parser.add_subparsers(dest="fn_command", metavar="VERB")
    create = sub.add_parser("create", parents=[common], help="deploy a function (at zero until its first request)")
    add_function_flags(create)
    create.add_argument("--idle-timeout", type=duration_s, default=None, help="idle time before scaling to zero")
    create.set_defaults(func=_create)
    sub.add_parser("list", parents=[common], help="every function and its state").set_defaults(func=_list)
    describe = sub.add_parser("describe", parents=[common], help="state, instances, the last cold start's plan and timeline")
    describe.add_argument("name")
    describe.set_defaults(func=_describe)
    delete = sub.add_parser("delete", parents=[common], help="drain, scale to zero, release, forget")
    delete.add_argument("name")
    delete.set_defaults(func=_delete)
    def usage(_args: argparse.Namespace) -> int:
        parser.print_help()
        return 2

    parser.set_defaults(func=usage)


def _client(args: argparse.Namespace) -> Any:
    from hydraserve.activator.admin_client import GatewayAdminClient
    from hydraserve.auth import read_token

    return GatewayAdminClient(args.gateway, read_token(args.token_file, TOKEN_ENV))


def _create(args: argparse.Namespace) -> int:
    fields = {"ttft_slo_s": args.ttft_slo, "tpot_slo_s": args.tpot_slo, "idle_timeout_s": args.idle_timeout,
              "concurrency": args.concurrency, "max_instances": args.max_instances,
              "group_replicas": args.group_replicas}
    body = {"name": args.name, "model_uri": args.model} | {k: v for k, v in fields.items() if v is not None}
    created = _client(args).create(body)
    print(f"function {created['name']} created: at zero; first request cold-starts it "
          f"({args.gateway}/v1/completions with model {created['name']!r})")
    return 0


def _list(args: argparse.Namespace) -> int:
    functions = _client(args).list()
    print(f"{'NAME':24} {'STATE':9} {'INSTANCES':>9} {'INFLIGHT':>8} {'WAITING':>7} {'COLD STARTS':>11}  MODEL")
    for f in functions:
        print(f"{f['name']:24} {f['state']:9} {len(f['instances']):>9} {f['inflight']:>8} {f['waiting']:>7} "
              f"{f['cold_starts']:>11}  {f['model_uri']}")
    return 0


def _describe(args: argparse.Namespace) -> int:
    from hydraserve.contracts.timeline import Timeline
    from hydraserve.contracts.timeline_report import format_timeline

    described = _client(args).describe(args.name)
    timeline = described.pop("last_cold_start", None)
    print(json.dumps(described, indent=2))
    if timeline and timeline["events"]:
        print("\nLast cold start:")
        print(format_timeline(Timeline.model_validate(timeline)))
    return 0


def _delete(args: argparse.Namespace) -> int:
    deleted = _client(args).delete(args.name)
    print(f"function {args.name} deleted ({deleted['stopped_instances']} instance(s) stopped)")
    return 0

