"""`kn hydra`: the kn plugin (an executable ``kn-hydra`` on PATH, installed with the package).

``kn hydra create NAME --model s3://... [--ttft-slo 7.5s --tpot-slo 200ms --gpu 1 --namespace NS]``
writes the Knative Service with every annotation, volume and scheduler setting the fast path
needs (provider/knative/service.py); ``--dry-run -o yaml`` prints it without a cluster. The
verbs and flags are those of `hydraserve fn` (one vocabulary). Against a cluster (create,
describe, list, delete) this is not built yet: they say so and exit 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from hydraserve.activator.fn_cmd import add_function_flags, duration_s

NOT_YET = ("needs a cluster, which this version of kn-hydra cannot talk to yet (the Kubernetes backend is "
           "the open Knative issue); use --dry-run -o yaml and kubectl apply -f -")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kn hydra", description="HydraServe functions on Knative")
    sub = parser.add_subparsers(dest="verb", metavar="VERB", required=True)
    create = sub.add_parser("create", help="write a function's Knative Service")
    add_function_flags(create)
    create.add_argument("--gpu", type=int, default=None, help="GPUs per worker (0: a CPU worker; default 1)")
    create.add_argument("--namespace", "-n", default="default", help="the Service's namespace")
    create.add_argument("--image", default=None, help="the runtime image (default: the release's)")
    create.add_argument("--cpu", default=None, help="CPU each worker requests (default 2)")
    create.add_argument("--memory", default=None, help="host memory of each worker, e.g. 4Gi (default 32Gi)")
    create.add_argument("--timeout", type=duration_s, default=None,
                        help="the revision's timeout, covering a cold start and the whole answer (default 600s)")
    create.add_argument("--s3-secret", default="hydraserve-s3", help="Secret with the S3 credentials ('' for none)")
    create.add_argument("--dry-run", action="store_true", help="print the Service, touch no cluster")
    create.add_argument("-o", "--output", choices=("yaml", "json"), default="yaml", help="with --dry-run")
    for verb, text in (("describe", "the last cold start's plan and timeline"), ("list", "every function"),
                       ("delete", "drain, scale to zero, delete")):
        one = sub.add_parser(verb, help=text)
        if verb != "list":
            one.add_argument("name")
        one.add_argument("--namespace", "-n", default="default")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.verb != "create" or not args.dry_run:
        print(f"kn hydra {args.verb}: {NOT_YET}", file=sys.stderr)
        return 2
    import yaml
    from pydantic import ValidationError

    from hydraserve.provider.knative.service import HydraService, knative_service

    given = {"ttft_slo_s": args.ttft_slo, "tpot_slo_s": args.tpot_slo, "gpus": args.gpu,
             "concurrency": args.concurrency, "max_instances": args.max_instances,
             "group_replicas": args.group_replicas, "image": args.image, "cpu": args.cpu, "memory": args.memory,
             "timeout_s": None if args.timeout is None else round(args.timeout)}
    try:
        fn = HydraService(name=args.name, namespace=args.namespace, model_uri=args.model,
                          s3_secret=args.s3_secret or None, **{k: v for k, v in given.items() if v is not None})
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
        print(f"kn hydra create: {problems}", file=sys.stderr)
        return 2
    service = knative_service(fn)
    if args.output == "json":
        print(json.dumps(service, indent=2))
    else:
        print(yaml.safe_dump(service, sort_keys=False), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
