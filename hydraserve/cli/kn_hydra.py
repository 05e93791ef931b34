"""`kn hydra`: the kn plugin (an executable ``kn-hydra`` on PATH, installed with the package).

``kn hydra create NAME --model s3://... [--ttft-slo 7.5s --tpot-slo 200ms --idle-timeout 30s --gpu 1 -n NS]``
writes the Knative Service with every annotation, volume and scheduler setting the fast path
needs (provider/knative/service.py); ``--dry-run -o yaml`` prints it without a cluster.
``describe NAME`` shows the Service and its last cold start (the plan and timeline the
interceptor wrote on the function's newest pod), ``list`` every HydraServe function, ``delete``
the Service and its worker Secret (Knative drains and removes its pods). The verbs and flags are
those of `hydraserve fn` (one vocabulary). The cluster is KUBECONFIG's (or --kubeconfig).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

from hydraserve.cli.flags import duration_arg, given_settings
from hydraserve.cli.fn import FUNCTION_FLAGS, add_function_flags

GROUP, VERSION, PLURAL = "serving.knative.dev", "v1", "services"
PART_OF = "app.kubernetes.io/part-of=hydraserve"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kn hydra", description="HydraServe functions on Knative")
    sub = parser.add_subparsers(dest="verb", metavar="VERB", required=True)
    create = sub.add_parser("create", help="write a function's Knative Service")
    add_function_flags(create)
    create.add_argument("--gpu", type=int, default=None, help="GPUs per worker (0: a CPU worker; default 1)")
    create.add_argument("--image", default=None, help="the runtime image (default: the release's GPU image, its CPU "
                        "image with --gpu 0: only the GPU image asks for GPUs)")
    create.add_argument("--cpu", default=None, help="CPU each worker requests (default 2)")
    create.add_argument("--memory", default=None, help="host memory of each worker, e.g. 4Gi (default 32Gi)")
    create.add_argument("--timeout", type=duration_arg, default=None,
                        help="the revision's timeout, covering a cold start and the whole answer (default 600s)")
    create.add_argument("--s3-secret", default="hydraserve-s3", help="Secret with the S3 credentials ('' for none)")
    create.add_argument("--dry-run", action="store_true", help="print the Service, touch no cluster")
    create.add_argument("-o", "--output", choices=("yaml", "json"), default="yaml", help="with --dry-run")
    for verb, text in (("describe", "the Service and its last cold start's plan and timeline"),
                       ("list", "every HydraServe function"), ("delete", "delete the Service and its worker Secret")):
        one = sub.add_parser(verb, help=text)
        if verb != "list":
            one.add_argument("name")
    for one in sub.choices.values():
        one.add_argument("--namespace", "-n", default="default", help="the Service's namespace")
        one.add_argument("--kubeconfig", default=None, help="default: KUBECONFIG, then ~/.kube/config")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from hydraserve.errors import HydraError

    try:
        return int(VERBS[args.verb](args))
    except HydraError as exc:
        print(f"kn hydra {args.verb}: {exc.message}", file=sys.stderr)
        return 1


def _create(args: argparse.Namespace) -> int:
    import yaml
    from pydantic import ValidationError

    from hydraserve.provider.knative.service import HydraService, knative_service

    where = {"gpus": args.gpu, "image": args.image, "cpu": args.cpu, "memory": args.memory,
             "timeout_s": None if args.timeout is None else round(args.timeout)}
    given = {k: v for k, v in where.items() if v is not None} | given_settings(args, FUNCTION_FLAGS)
    try:
        fn = HydraService(name=args.name, namespace=args.namespace, model_uri=args.model,
                          s3_secret=args.s3_secret or None, **given)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
        print(f"kn hydra create: {problems}", file=sys.stderr)
        return 2
    service = knative_service(fn)
    if args.dry_run:
        print(json.dumps(service, indent=2) if args.output == "json" else yaml.safe_dump(service, sort_keys=False),
              end="\n" if args.output == "json" else "")
        return 0
    _call(lambda api: api.create_namespaced_custom_object(GROUP, VERSION, args.namespace, PLURAL, service),
          args, f"creating service {args.name}")
    print(f"Service '{args.name}' created in namespace '{args.namespace}' (at zero until its first request).")
    return 0


def _list(args: argparse.Namespace) -> int:
    from hydraserve.provider.knative.service import MODEL_ANNOTATION

    found = _call(lambda api: api.list_namespaced_custom_object(GROUP, VERSION, args.namespace, PLURAL,
                                                                label_selector=PART_OF), args, "listing services")
    rows = [("NAME", "MODEL", "URL", "READY")]
    for svc in found.get("items", []):
        annotations = svc["spec"]["template"].get("metadata", {}).get("annotations", {})
        rows.append((svc["metadata"]["name"], annotations.get(MODEL_ANNOTATION, "?"),
                     (svc.get("status") or {}).get("url", "-"), _ready(svc)))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    return 0


def _describe(args: argparse.Namespace) -> int:
    from kubernetes.client import CoreV1Api

    from hydraserve.contracts.plan import Plan
    from hydraserve.contracts.pod import PLAN_ANNOTATION, TIMELINE_ANNOTATION
    from hydraserve.contracts.timeline import Timeline
    from hydraserve.contracts.timeline_report import format_timeline
    from hydraserve.provider.knative.service import MODEL_ANNOTATION, TPOT_SLO_ANNOTATION, TTFT_SLO_ANNOTATION

    svc = _call(lambda api: api.get_namespaced_custom_object(GROUP, VERSION, args.namespace, PLURAL, args.name),
                args, f"reading service {args.name}")
    annotations = svc["spec"]["template"].get("metadata", {}).get("annotations", {})
    print(f"Name:       {args.name}\nNamespace:  {args.namespace}\nModel:      {annotations.get(MODEL_ANNOTATION)}")
    print(f"SLOs:       TTFT {annotations.get(TTFT_SLO_ANNOTATION)}, TPOT {annotations.get(TPOT_SLO_ANNOTATION)}")
    print(f"URL:        {(svc.get('status') or {}).get('url', '-')}\nReady:      {_ready(svc)}")
    pods = _call(lambda _api: CoreV1Api(_api.api_client).list_namespaced_pod(
        args.namespace, label_selector=f"serving.knative.dev/service={args.name}"), args, "listing its pods").items
    placed = [p for p in pods if PLAN_ANNOTATION in (p.metadata.annotations or {})]
    if not placed:
        print("\nLast cold start: none yet (the function has been at zero since it was created)")
        return 0
    newest = max(placed, key=lambda p: p.metadata.creation_timestamp)
    plan = Plan.model_validate_json(newest.metadata.annotations[PLAN_ANNOTATION])
    print(f"\nLast cold start: pod {newest.metadata.name}, instance {plan.instance_id}")
    print(f"  plan: pipeline of {plan.pipeline_size} on {', '.join(plan.nodes)}, predicted TTFT "
          f"{plan.predicted_ttft_s:.2f} s, TPOT {plan.predicted_tpot_s * 1000:.0f} ms ({plan.policy})")
    for st in plan.stages:
        print(f"  stage {st.stage.index}: {st.node} gpu {st.gpu}, layers {st.stage.layer_start}-"
              f"{st.stage.layer_end - 1}, {st.memory_gb:.2f} GB, {'full' if st.full else 'partial'}, from {st.source}")
    raw = newest.metadata.annotations.get(TIMELINE_ANNOTATION)
    print("\n" + (format_timeline(Timeline.model_validate_json(raw)) if raw else "  (its group is not serving yet)"))
    return 0


def _delete(args: argparse.Namespace) -> int:
    from kubernetes.client import ApiException, CoreV1Api

    from hydraserve.contracts.pod import worker_secret_name

    _call(lambda api: api.delete_namespaced_custom_object(GROUP, VERSION, args.namespace, PLURAL, args.name),
          args, f"deleting service {args.name}")

    def drop_secret(api: Any) -> None:
        try:
            CoreV1Api(api.api_client).delete_namespaced_secret(worker_secret_name(args.name), args.namespace)
        except ApiException as exc:
            if exc.status != 404:  # none yet: it never cold-started
                raise

    _call(drop_secret, args, "deleting its worker secret")
    print(f"Service '{args.name}' deleted in namespace '{args.namespace}'.")
    return 0


def _ready(svc: dict[str, Any]) -> str:
    for condition in (svc.get("status") or {}).get("conditions", []):
        if condition.get("type") == "Ready":
            return str(condition.get("status", "Unknown"))
    return "Unknown"


def _call(fn: Any, args: argparse.Namespace, what: str) -> Any:
    """``fn(CustomObjectsApi)``; an API error is a HydraError naming ``what``."""
    from kubernetes.client import ApiException, CustomObjectsApi

    from hydraserve.provider.knative.kube import api_client, api_error

    api = CustomObjectsApi(api_client(args.kubeconfig, in_cluster=False))
    try:
        return fn(api)
    except ApiException as exc:
        raise api_error(exc, what) from exc


VERBS = {"create": _create, "list": _list, "describe": _describe, "delete": _delete}

if __name__ == "__main__":
    sys.exit(main())
