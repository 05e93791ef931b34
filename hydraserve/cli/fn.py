"""`hydraserve fn`: create, update, list, describe, read the logs of and delete functions on a
running gateway (its admin API, with its token). The verbs and flags are the ones `kn hydra`
uses on Knative, so users learn one vocabulary: ``fn create NAME --model s3://... --ttft-slo
7.5s --tpot-slo 200ms``; ``list`` and ``describe`` print JSON or YAML for scripts (``-o``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from hydraserve.cli.flags import add_setting_flags, given_settings

GATEWAY_ENV = "HYDRASERVE_GATEWAY"
TOKEN_ENV = "HYDRASERVE_GATEWAY_TOKEN"
# The FunctionConfig fields `fn create/update` and `kn hydra create` take as flags (one vocabulary).
FUNCTION_FLAGS = ("ttft_slo_s", "tpot_slo_s", "idle_timeout_s", "concurrency", "max_instances", "group_replicas")


def add_function_flags(create: argparse.ArgumentParser, *, model_required: bool = True, defaults: bool = True) -> None:
    """The name, the model and the settings `fn create`, `fn update` and `kn hydra create` share;
    ``defaults=False`` (update): a setting not given is None, so the current one stays."""
    create.add_argument("name", help="function name: lowercase letters, digits, '-' (also its OpenAI model name)")
    create.add_argument("--model", required=model_required,
                        help="the model: s3://bucket/prefix of a Hugging Face directory (fn create: or a local "
                             "directory, pushed first to s3://BUCKET/NAME)")
    add_setting_flags(create, FUNCTION_FLAGS, defaults=defaults)


def configure(parser: argparse.ArgumentParser) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--gateway", default=os.environ.get(GATEWAY_ENV, "http://127.0.0.1:8080"),
                        help=f"the gateway's URL (default ${GATEWAY_ENV} or http://127.0.0.1:8080)")
    common.add_argument("--token-file", default=None,
                        help=f"file holding the gateway's admin token (`up` prints it); else ${TOKEN_ENV}")
    sub = parser.add_subparsers(dest="fn_command", metavar="VERB")
    create = sub.add_parser("create", parents=[common], help="deploy a function (at zero until its first request)")
    add_function_flags(create)
    create.add_argument("--bucket", default="models",
                        help="with --model DIR: the bucket it is pushed to, as s3://BUCKET/NAME (default models)")
    create.add_argument("--endpoint-url", default=None,
                        help="with --model DIR: the S3 endpoint (default AWS_ENDPOINT_URL; `up` writes an env file)")
    create.set_defaults(func=_create)
    update = sub.add_parser("update", parents=[common], help="change some settings; the next cold start uses "
                            "them, running instances serve on")
    add_function_flags(update, model_required=False, defaults=False)
    update.set_defaults(func=_update)
    listing = sub.add_parser("list", parents=[common], help="every function and its state")
    _add_output(listing)
    listing.set_defaults(func=_list)
    describe = sub.add_parser("describe", parents=[common], help="state, instances, the last cold start's plan and timeline")
    describe.add_argument("name")
    _add_output(describe)
    describe.set_defaults(func=_describe)
    logs = sub.add_parser("logs", parents=[common], help="the end of each worker's log (running instances, "
                          "the last failed cold start)")
    logs.add_argument("name")
    logs.add_argument("--tail", type=int, default=None, help="lines per worker (1 to 10000; default 200)")
    logs.set_defaults(func=_logs)
    delete = sub.add_parser("delete", parents=[common], help="drain, scale to zero, release, forget")
    delete.add_argument("name")
    delete.set_defaults(func=_delete)
    def usage(_args: argparse.Namespace) -> int:
        parser.print_help()
        return 2

    parser.set_defaults(func=usage)


def _add_output(verb: argparse.ArgumentParser) -> None:
    verb.add_argument("-o", "--output", choices=("json", "yaml"), default=None,
                      help="print the gateway's answer as JSON or YAML (default: for people)")


def _print_as(data: object, output: str) -> None:
    """``data`` as JSON or YAML, for scripts (the default output is for people)."""
    if output == "json":
        print(json.dumps(data, indent=2))
        return
    import yaml

    print(yaml.safe_dump(data, sort_keys=False), end="")


def _client(args: argparse.Namespace) -> Any:
    from hydraserve.activator.embedded.admin_client import GatewayAdminClient
    from hydraserve.auth import read_token

    return GatewayAdminClient(args.gateway, read_token(args.token_file, TOKEN_ENV))


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    """The FunctionConfig fields the flags give (those not given are left out)."""
    model = {"model_uri": args.model} if args.model is not None else {}
    return model | given_settings(args, FUNCTION_FLAGS)


def _create(args: argparse.Namespace) -> int:
    if not args.model.startswith("s3://") and os.path.isdir(args.model):
        args.model = _push_directory(args)
    created = _client(args).create({"name": args.name} | _settings(args))
    print(f"function {created['name']} created: at zero; first request cold-starts it "
          f"({args.gateway}/v1/completions with model {created['name']!r})")
    return 0


def _push_directory(args: argparse.Namespace) -> str:
    """Push the local model directory ``--model`` (checked first, with a progress bar) to
    s3://BUCKET/NAME; its URI."""
    from hydraserve.contracts.function import validate_function_name
    from hydraserve.errors import InvalidRequestError
    from hydraserve.weights.push import push_checked

    try:
        uri = f"s3://{args.bucket}/{validate_function_name(args.name)}"
    except ValueError as exc:
        raise InvalidRequestError(str(exc), param="name") from None
    print(f"pushing {args.model} to {uri}", file=sys.stderr)
    manifest = push_checked(args.model, uri, args.endpoint_url, create_bucket=True)
    print(f"pushed {len(manifest.files)} files, {manifest.total_bytes} bytes", file=sys.stderr)
    return uri


def _update(args: argparse.Namespace) -> int:
    fields = _settings(args)
    if not fields:
        print("hydraserve fn update: nothing to change (give --model, --ttft-slo, --concurrency, ...)", file=sys.stderr)
        return 2
    updated = _client(args).update(args.name, fields)
    changes = ", ".join(f"{k} {c['from']} -> {c['to']}" for k, c in updated["changed"].items())
    print(f"function {args.name} updated: {changes or 'nothing changed'}")
    running = len(updated["instances"])
    print("its next cold start uses the new settings" + (
        f"; the {running} instance(s) running keep serving as they started, until they scale in" if running else ""))
    return 0


def _list(args: argparse.Namespace) -> int:
    functions = _client(args).list()
    if args.output:
        _print_as(functions, args.output)
        return 0
    print(f"{'NAME':24} {'STATE':9} {'INSTANCES':>9} {'INFLIGHT':>8} {'WAITING':>7} {'COLD STARTS':>11}  MODEL")
    for f in functions:
        print(f"{f['name']:24} {f['state']:9} {len(f['instances']):>9} {f['inflight']:>8} {f['waiting']:>7} "
              f"{f['cold_starts']:>11}  {f['model_uri']}")
    return 0


def _describe(args: argparse.Namespace) -> int:
    from hydraserve.contracts.timeline import Timeline
    from hydraserve.contracts.timeline_report import format_timeline

    described = _client(args).describe(args.name)
    if args.output:
        _print_as(described, args.output)
        return 0
    timeline = described.pop("last_cold_start", None)
    print(json.dumps(described, indent=2))
    if timeline and timeline["events"]:
        print("\nLast cold start:")
        print(format_timeline(Timeline.model_validate(timeline)))
    return 0


def _logs(args: argparse.Namespace) -> int:
    workers = _client(args).logs(args.name, args.tail)
    if not workers:
        print(f"function {args.name}: no worker logs (no instance running, no failed cold start)", file=sys.stderr)
    for index, worker in enumerate(workers):
        if index:
            print()
        what = "last failed cold start" if worker.get("failed_start") else "running"
        print(f"==> instance {worker['instance']} stage {worker['stage']} on {worker['node']} ({what}) <==")
        print(worker["log"])  # JSON lines, as the worker wrote them
    return 0


def _delete(args: argparse.Namespace) -> int:
    deleted = _client(args).delete(args.name)
    print(f"function {args.name} deleted ({deleted['stopped_instances']} instance(s) stopped)")
    return 0

