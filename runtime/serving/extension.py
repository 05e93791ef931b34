"""Our vLLM worker extension (``worker_extension_cls``): what the worker process asks of vLLM's workers.

vLLM mixes this class into each of its worker classes; the worker's API process calls its
methods with ``collective_rpc``, which reaches every pipeline stage, remote ones included.
"""

from __future__ import annotations

from typing import Any

QUALNAME = "hydraserve.runtime.serving.extension.HydraServeWorkerExtension"


class HydraServeWorkerExtension:
    """Methods of every vLLM worker of ours."""

    def hydraserve_load_timeline(self) -> list[dict[str, Any]]:
        """This worker's loading moments (hydraserve.runtime.serving.loader), JSON-ready."""
        from hydraserve.runtime.serving.loader import LOAD_TIMELINE

        return [event.model_dump(mode="json") for event in LOAD_TIMELINE.events]
