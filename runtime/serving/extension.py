"""Our vLLM worker extension (``worker_extension_cls``): what the worker process asks of vLLM's workers.

vLLM mixes this class into each of its worker classes; the worker's API process calls its
methods with ``collective_rpc``, which reaches every pipeline stage, remote ones included.
"""

from __future__ import annotations

import os
import signal
from typing import Any

QUALNAME = "hydraserve.runtime.serving.extension.HydraServeWorkerExtension"


class HydraServeWorkerExtension:
    """Methods of every vLLM worker of ours."""

    def hydraserve_load_timeline(self) -> list[dict[str, Any]]:
        """This worker's loading moments (hydraserve.runtime.serving.loader), JSON-ready."""
        from hydraserve.runtime.serving.loader import LOAD_TIMELINE

        return [event.model_dump(mode="json") for event in LOAD_TIMELINE.events]

    def hydraserve_release(self) -> None:
        """The group's head consolidated: a stage after the first tells its process (the one
        that forked it: our stage worker) that the group ended. vLLM's own shutdown does not reach
        a remote stage's worker, which would wait for the head forever."""
        from vllm.distributed.parallel_state import get_pp_group

        if not get_pp_group().is_first_rank:
            os.kill(os.getppid(), RELEASED)


RELEASED = signal.SIGUSR1  # what a stage worker hears when its head released the group
