"""vLLM's general-plugin entry point (``vllm.general_plugins: hydraserve``): runs in every vLLM process.

vLLM calls :func:`register` in its API server, engine core and every worker process, before
anything is built; it must be idempotent and cheap. It registers the ``hydraserve`` load
format (hydraserve.runtime.serving.loader) and applies the fixes we carry for vLLM on CPUs
(hydraserve.runtime.serving.fixes). Nothing here changes vLLM for a process that neither asks
for our load format nor sets our environment.
"""

from __future__ import annotations

import logging

LOAD_FORMAT = "hydraserve"
log = logging.getLogger(__name__)
_registered = False


def register() -> None:
    """Register the load format and apply the fixes, once per process."""
    global _registered
    if _registered:
        return
    _registered = True
    from vllm.model_executor.model_loader import register_model_loader

    from hydraserve.leftovers import record_shared_memory
    from hydraserve.runtime.serving.fixes import apply_fixes
    from hydraserve.runtime.serving.loader import HydraServeModelLoader

    register_model_loader(LOAD_FORMAT)(HydraServeModelLoader)
    apply_fixes()
    record_shared_memory()  # its segments are removed even if the worker is killed
