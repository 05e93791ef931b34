"""Consolidation on vLLM: a group's full head starts a standalone engine and the group steps aside.

Started by the worker of a pipeline group's head that was given memory for the whole model
(``full``). Each step is a moment on the worker's timeline:
1. after the group's first request (the first token is not slowed by what follows), the layers
   the head lacks are fetched through its files (the node's loaderd, at background priority:
   behind any cold start's bytes), and held until step 2 has them (``consolidation_fetched``);
2. a standalone vLLM engine of the whole model starts in this process beside the group's
   (its own engine core and worker, forked; our load format reads every tensor from the node's
   shared memory) (``standalone_started``);
3. vLLM's OpenAI app moves to it (hydraserve.runtime.serving.handover): new requests go to it at
   once, requests in flight finish on the group within ``handover_s`` and are re-prefilled on
   it after that, none lost (``handover_done``, with how many moved);
4. the worker says it consolidated (``consolidated``): its launcher stops the partial stages
   and frees their memory; then the group's engine stops, in a thread (the serving loop goes on).
A failure before step 3 leaves the group serving as it was (logged, on the timeline).

Every other stage given memory for the whole model becomes a replica (``become_replica``): once it
joined, it fetches what it lacks the same way, and when the group ends (its head retired the
group's engine) it starts a standalone engine and serves the API itself (``replica_built``,
``replica_serving``; its status says consolidated): its launcher makes it an instance of its own.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hydraserve.contracts.stage import StageSpec
from hydraserve.contracts.timeline import Moment, Timeline
from hydraserve.contracts.worker import WorkerEnvironment
from hydraserve.weights.model_files import ModelFiles
from hydraserve.weights.tensor_sources import tensor_source

log = logging.getLogger(__name__)


def standalone(settings: WorkerEnvironment) -> WorkerEnvironment:
    """The same worker holding the whole model alone (no stage, no peers)."""
    return settings.model_copy(update={"stage": None, "peers": [], "group_layers": [], "transport_port": None})


async def fetch_the_rest(files: ModelFiles, stage: StageSpec, timeline: Timeline) -> Any:
    """The tensors ``stage`` lacks, fetched at background priority and waited for; the source
    holding them (close it once the standalone engine has its own lease)."""
    whole = files.stage_tensor_names(StageSpec.whole(stage.num_layers))
    mine = set(files.stage_tensor_names(stage))
    missing = [n for n in whole if n not in mine]

    timeline.mark(Moment.CONSOLIDATION_FETCH_STARTED, tensors=len(missing))

    def fetch() -> Any:
        source = tensor_source(files, missing, background=True)
        for name in missing:
            source.get(name)
        return source

    source = await asyncio.get_running_loop().run_in_executor(None, fetch)
    timeline.mark(Moment.CONSOLIDATION_FETCHED, tensors=len(missing))
    return source


async def consolidate(settings: WorkerEnvironment, files: ModelFiles, model_dir: Path | str, server: Any,
                      timeline: Timeline, on_done: Callable[[], None], *, first_request: asyncio.Event,
                      handover_s: float) -> None:
    """Steps 1-4 of the module docstring; ``server`` is the head's VllmServer (its engine a
    HandoverEngine), ``on_done`` marks the worker consolidated."""
    from hydraserve.runtime.serving.engine import build_engine

    assert settings.stage is not None
    try:
        await first_request.wait()
        held = await fetch_the_rest(files, settings.stage, timeline)
        try:
            engine = await build_engine(standalone(settings), model_dir, timeline)
        finally:
            held.close()
        timeline.mark(Moment.STANDALONE_STARTED)
    except Exception:
        log.exception("consolidation failed: the group serves on")
        timeline.mark(Moment.CONSOLIDATION_FAILED)
        return
    group_engine = server.engine.engine
    moved = await server.engine.switch(engine, handover_s)
    timeline.mark(Moment.HANDOVER_DONE, moved=moved)
    on_done()  # the launcher may stop the other stages now: nothing runs on the group any more
    timeline.mark(Moment.CONSOLIDATED)
    try:
        await group_engine.collective_rpc("hydraserve_release", timeout=5)  # the other stages: the group ended
    except Exception as exc:  # a stage already gone: its launcher stops it anyway
        log.warning("could not tell every stage the group ended: %s", exc)
    await asyncio.get_running_loop().run_in_executor(None, server.engine.retire, group_engine)  # off the loop
    log.info("consolidated: the whole model serves alone", extra={"moved": moved})


async def become_replica(settings: WorkerEnvironment, files: ModelFiles, model_dir: Path | str, stage: Any,
                         state: Any, front: Any) -> None:
    """A full stage's way to a standalone replica (the module docstring); ``stage`` its
    StageWorkers, ``state`` and ``front`` the worker's."""
    from hydraserve.runtime.serving.engine import start_server

    assert settings.stage is not None
    held = await fetch_the_rest(files, settings.stage, state.timeline)
    try:
        while not state.is_draining and stage.running():  # until the group ends
            await asyncio.sleep(0.1)
        if state.is_draining:
            return
        stage.shutdown()
        server = await start_server(standalone(settings), model_dir, state.timeline)
    finally:
        held.close()
    state.timeline.mark(Moment.REPLICA_BUILT)
    front.api = True
    state.set_serving(server)
    state.mark_consolidated()
    state.timeline.mark(Moment.REPLICA_SERVING)
    log.info("serving as a standalone replica")
