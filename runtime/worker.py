"""``python -m hydraserve.runtime.worker``: a function worker, as its environment says.

The entry point every launcher starts (the process launcher, a warm pool's adoption, a pod's
``hydraserve serve``): it reads the worker's environment (hydraserve.contracts.worker) and runs
the vLLM worker (hydraserve.runtime.serving.worker). Light on purpose: a worker must never
import Flask (vLLM walks every loaded module's attributes at start-up, and Flask's request
proxy raises).
"""

from __future__ import annotations

import sys

from hydraserve.contracts.worker import WorkerEnvironment
from hydraserve.logs import configure_logging


def run(settings: WorkerEnvironment, *, adopted_at: float | None = None) -> int:
    """Serve as ``settings`` says until SIGTERM; ``adopted_at``: a pooled process handed its work then."""
    from hydraserve.runtime.serving.worker import run_worker

    return run_worker(settings, adopted_at=adopted_at)


def main() -> int:
    configure_logging("worker")
    return run(WorkerEnvironment.from_env())


if __name__ == "__main__":
    sys.exit(main())
