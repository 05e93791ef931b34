"""`hydraserve bench`: the benchmark command group. Each benchmark is a module in the repo's
benchmarks/ folder exposing ``configure(parser)``; add yours to BENCHMARKS. Benchmarks run from a
source checkout (they build emulated nodes and install their own tools), so the folder is
located next to the package rather than imported as an installed package."""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

# (subcommand, help, file in benchmarks/)
BENCHMARKS: list[tuple[str, str, str]] = [
    ("loader", "loaderd vs single-stream boto3 vs Run:ai streamer on a tc-capped emulated node",
     "loader_bench.py"),
    ("coldstart", "cold start: real vLLM baselines vs ours (vLLM, the first token from our compact engine) vs the bound",
     "coldstart_bench.py"),
    ("loaderd-startup", "how fast loaderd starts and how much memory it holds (no torch)", "loaderd_startup.py"),
    ("pipeline", "HydraServe's Figure 7 here: serverless vLLM, ServerlessLLM (cold, cached), ours with one "
     "worker and with the planner's pipeline group, the bound and the start-up floor", "pipeline_bench.py"),
    ("gateway", "N concurrent requests to a function at zero through one cold start, then warm throughput and "
     "added latency through the gateway vs straight to the worker", "gateway_bench.py"),
]

BENCH_DIR = Path(__file__).resolve().parents[2] / "benchmarks"


def _load(file: str) -> ModuleType:
    path = BENCH_DIR / file
    if not path.is_file():
        raise SystemExit(f"{path} not found: run benchmarks from a source checkout (pip install -e .)")
    if str(BENCH_DIR) not in sys.path:
        sys.path.insert(0, str(BENCH_DIR))
    spec = importlib.util.spec_from_file_location(f"hydraserve_bench_{path.stem}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # as an import would (dataclasses look their module up there)
    spec.loader.exec_module(module)
    return module


def configure(parser: argparse.ArgumentParser) -> None:
    """Add one subcommand per benchmark (their modules import only the standard library at top)."""
    sub = parser.add_subparsers(dest="bench", metavar="BENCHMARK")
    for name, help_text, file in BENCHMARKS:
        p = sub.add_parser(name, help=help_text, description=help_text)
        if (BENCH_DIR / file).is_file():
            _load(file).configure(p)
        else:
            p.set_defaults(func=lambda args, f=file: _load(f) and 2)
    def usage(_args: argparse.Namespace) -> int:
        parser.print_help()
        return 2

    parser.set_defaults(func=usage)
