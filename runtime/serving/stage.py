"""A pipeline stage after the head: vLLM's workers of one node rank, serving the head's steps.

A pipeline group is vLLM's own pipeline parallelism across nodes (hydraserve.runtime.serving.args):
the head's engine drives every stage. On a stage's node, this process plays ``vllm serve
--headless --node-rank i``: it builds vLLM's executor for its rank, whose worker process (forked
from this one) joins the head's process group, loads this stage's layers with our load format
(its loading moments reach the head's timeline through the worker extension) and then executes
whatever the head schedules. The stage is ready once its worker has loaded and joined; when its
worker exits the group has ended: a partial stage drains, a full one becomes a replica
(hydraserve.runtime.serving.consolidation). It serves no API while in the group (the front answers
health, readiness, the timeline and metrics). Called by the worker
(hydraserve.runtime.serving.worker) for every stage but the head.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hydraserve.contracts.timeline import Moment, Timeline
from hydraserve.contracts.worker import WorkerEnvironment
from hydraserve.runtime.serving.engine import parse_engine_args

log = logging.getLogger(__name__)


class StageWorkers:
    """vLLM's executor of this node's rank; ``watch`` calls back when its workers are gone."""

    def __init__(self, executor: Any) -> None:
        self.executor = executor
        self._ended = threading.Event()

    def running(self) -> bool:
        return not self._ended.is_set()

    def end(self) -> None:
        """The head released the group (our worker extension signalled it): stop the workers."""
        self._ended.set()
        self.shutdown()

    def watch(self, on_exit: Callable[[str], None]) -> None:
        def monitor() -> None:
            self.executor.start_worker_monitor(inline=True)  # returns once a worker died
            self._ended.set()
            on_exit("its vLLM worker exited (the group's head released it, or a peer went away)")

        threading.Thread(target=monitor, name="stage-monitor", daemon=True).start()

    def shutdown(self) -> None:
        self.executor.shutdown()


async def start_stage(settings: WorkerEnvironment, model_dir: Path | str, timeline: Timeline) -> StageWorkers:
    """This rank's vLLM workers, loaded and joined to the head's group."""
    args = parse_engine_args(settings, model_dir)
    executor = await asyncio.get_running_loop().run_in_executor(None, _build_executor, args, timeline)
    timeline.mark(Moment.STAGE_JOINED, stage=settings.stage.index if settings.stage else 0)
    return StageWorkers(executor)


def _build_executor(args: Any, timeline: Timeline) -> Any:
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.usage.usage_lib import UsageContext
    from vllm.v1.executor.multiproc_executor import MultiprocExecutor

    vllm_config = AsyncEngineArgs.from_cli_args(args).create_engine_config(
        usage_context=UsageContext.OPENAI_API_SERVER, headless=True)
    timeline.mark(Moment.ENGINE_CONFIGURED)
    return MultiprocExecutor(vllm_config, monitor_workers=False)
