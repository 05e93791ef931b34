"""The `hydraserve` command: reads arguments and hands off to the component that does the work.

Every command is one module here, named after it (``hydraserve fn`` is ``cli/fn.py``; the kn
plugin ``kn hydra`` is ``cli/kn_hydra.py``), exposing ``configure(parser)``: it adds its
arguments and sets ``func`` (called with the parsed namespace, returns an exit code). Setting
flags come from ``cli/flags.py``. Command modules import heavy libraries (torch, boto3) inside
``func`` only, so `hydraserve --help` stays instant.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

# (command, help, module). Nested groups ("model tiny") are configured by their module.
COMMANDS: list[tuple[str, str, str]] = [
    ("model", "make and push model directories (tiny random models, S3 upload)",
     "hydraserve.cli.model"),
    ("generate", "generate text with our compact engine from a local dir or s3:// URI",
     "hydraserve.cli.generate"),
    ("serve", "run the function runtime server (one worker)", "hydraserve.cli.serve"),
    ("loaderd", "run the per-node loader daemon", "hydraserve.cli.loaderd"),
    ("loaderctl", "ask a running loaderd to prefetch (with progress), show what it holds, release",
     "hydraserve.cli.loaderctl"),
    ("placement", "run the placement service", "hydraserve.cli.placement"),
    ("interceptor", "run the Kubernetes control plane: placement service, and the pod interceptor while leader",
     "hydraserve.cli.interceptor"),
    ("plan", "show the placement plan for a function and why", "hydraserve.cli.plan"),
    ("simulate", "trace-driven cold-start simulator", "hydraserve.cli.simulate"),
    ("demo", "start everything locally, cold-start one request, print the timeline, exit",
     "hydraserve.cli.demo"),
    ("up", "start everything locally and keep it running", "hydraserve.cli.up"),
    ("fn", "create, update, list, describe, logs, delete functions on a running gateway (kn hydra's vocabulary)",
     "hydraserve.cli.fn"),
    ("bench", "benchmarks (loader, cold start, serving)", "hydraserve.cli.bench"),
]


def version() -> str:
    """The installed distribution's version (what pip shows), else the package's own."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    try:
        return installed("hydraserve")
    except PackageNotFoundError:  # run from a source tree without an install
        from hydraserve import __version__

        return __version__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hydraserve", description="HydraServe on Knative: serverless LLM functions that cold-start in seconds.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, help_text, module_name in COMMANDS:  # a missing or broken module fails loudly here
        importlib.import_module(module_name).configure(sub.add_parser(name, help=help_text, description=help_text))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    from hydraserve.errors import HydraError

    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
    except HydraError as exc:  # a clear one-line reason (the message names the object), no traceback
        print(f"hydraserve {args.command}: {exc.message}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
