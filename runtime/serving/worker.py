"""The function worker process on vLLM: listen first, then import, fetch and build, overlapped.

Order (each step a moment on the worker's timeline):
1. process_started (from /proc; for a pooled process, the adoption) -> http_listening: the
   front answers /healthz at once, so the platform sees a live process while the slow parts
   run; requests wait (bounded) for readiness.
2. The start-up task: vLLM's environment set (hydraserve.runtime.serving.args); the model's
   files opened (through loaderd: config, tokenizer and index read ahead) while vLLM imports
   (libraries_imported); config + tokenizer written where vLLM reads them (config_loaded);
   vLLM's engine built (engine_configured -> engine_started: the engine core process loads the
   weights with our load format as they land, then its KV cache; its moments, and every remote
   pipeline stage's, are read back through the worker extension); one token of warm-up
   (warmed_up); engine_ready: the front serves vLLM's OpenAI API.
3. SIGTERM/SIGINT: readiness off at once, in-flight requests finish (bounded by
   drain_timeout_s), vLLM's engine stops, the loaderd leases go back, the process exits.
Started by launchers (``python -m hydraserve.runtime.worker``, which picks this module for
``engine=vllm``), by a warm pool's adoption, or by ``hydraserve serve``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import socket
import tempfile
from collections.abc import Generator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import uvicorn

from hydraserve.contracts.timeline import Moment, Timeline
from hydraserve.contracts.worker import WorkerEnvironment
from hydraserve.leftovers import LEFTOVERS_KEY, RUN_DIR_PREFIX, record, remove_leftovers
from hydraserve.runtime.proc_clock import process_start_time
from hydraserve.runtime.serving.engine import VllmServer, use_engine_environment
from hydraserve.runtime.serving.fixes import HTTP_PORT_KEY
from hydraserve.runtime.serving.front import Front
from hydraserve.runtime.serving.stage import StageWorkers
from hydraserve.runtime.serving.state import ServingState
from hydraserve.weights.model_files import ModelFiles

log = logging.getLogger("hydraserve.worker")


class _Uvicorn(uvicorn.Server):
    """uvicorn without its own signal handling: the worker drains first, then stops it."""

    @contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


def run_worker(settings: WorkerEnvironment, *, adopted_at: float | None = None) -> int:
    """Serve as ``settings`` says until SIGTERM; ``adopted_at``: a pooled process handed its work then."""
    use_engine_environment(settings)  # before vLLM (and huggingface_hub) read it
    return asyncio.run(_serve(settings, adopted_at))


async def _serve(settings: WorkerEnvironment, adopted_at: float | None) -> int:
    state: ServingState[VllmServer | StageWorkers] = ServingState(settings.function, settings.revision)
    if adopted_at is not None:
        state.timeline.mark(Moment.PROCESS_STARTED, at=adopted_at, adopted=True,
                            pooled_s=round(adopted_at - process_start_time(), 3))
    else:  # /proc's start time has 10 ms ticks: never report a start before the spawn itself
        state.timeline.mark(Moment.PROCESS_STARTED, at=max(process_start_time(), settings.spawned_at or 0.0))
    front = Front(state, api=settings.is_head)
    listener = socket.create_server((settings.host, settings.port), reuse_port=False)
    server = _Uvicorn(uvicorn.Config(front, lifespan="off", log_level="warning", access_log=False,
                                     timeout_keep_alive=5, timeout_graceful_shutdown=5))
    http = asyncio.create_task(server.serve(sockets=[listener]))
    state.timeline.mark(Moment.HTTP_LISTENING, port=listener.getsockname()[1])
    os.environ[HTTP_PORT_KEY] = str(listener.getsockname()[1])  # vLLM's forked processes close it
    log.info("listening", extra={"port": listener.getsockname()[1], "model": settings.model_uri,
                                 "instance": settings.instance_id, "stage": settings.stage.model_dump()
                                 if settings.stage else "whole"})
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    run_dir = Path(tempfile.mkdtemp(prefix=RUN_DIR_PREFIX))
    record("dir", str(run_dir))  # its launcher removes it if this process is killed
    os.environ["VLLM_RPC_BASE_PATH"] = str(run_dir)  # vLLM's IPC sockets go with it, not litter /tmp
    os.environ["TMPDIR"] = str(run_dir)  # and its temporary files (a vllm_dist_* rendezvous per engine)
    tempfile.tempdir = None  # read TMPDIR again, here and in every process vLLM starts
    opened: list[ModelFiles] = []
    background: list[asyncio.Task[None]] = []  # consolidation, once started
    starting = asyncio.create_task(_start(settings, state, front, run_dir, opened, background))
    await stop.wait()
    log.info("draining")
    state.start_draining()
    if not await state.wait_idle(settings.drain_timeout_s):
        log.warning("drain timed out after %.0f s; stopping with requests in flight", settings.drain_timeout_s)
    for task in (starting, *background):
        task.cancel()
    server.should_exit = True
    await http
    serving = state.serving_or_none
    if serving is not None:
        serving.shutdown()
    for files in opened:
        files.release_leases()
    shutil.rmtree(run_dir, ignore_errors=True)
    _stop_what_is_left()
    if os.environ.get(LEFTOVERS_KEY):  # vLLM's segments of processes that had to be killed
        remove_leftovers(Path(os.environ[LEFTOVERS_KEY]))
    log.info("stopped")
    return 0


def _stop_what_is_left() -> None:
    """Any process of vLLM's still below this one once it has stopped (one that did not hear
    its shutdown) is killed: a stopped worker leaves nothing behind."""
    import psutil

    left = [p for p in psutil.Process().children(recursive=True) if not _is_resource_tracker(p)]
    for child in left:
        with contextlib.suppress(psutil.Error):
            child.kill()
    if left:
        log.warning("killed %d process(es) left after the engine stopped", len(left))


def _is_resource_tracker(process: Any) -> bool:
    """Python's resource tracker (it unlinks vLLM's shared-memory queues once we exit)."""
    try:
        return any("resource_tracker" in part for part in process.cmdline())
    except Exception:
        return False


async def _start(settings: WorkerEnvironment, state: ServingState[Any], front: Front, run_dir: Path,
                 opened: list[ModelFiles], background: list[asyncio.Task[None]]) -> None:
    from hydraserve.runtime.serving.consolidation import become_replica, consolidate
    from hydraserve.runtime.serving.engine import import_vllm, prepare_model, start_server
    from hydraserve.runtime.serving.extension import RELEASED
    from hydraserve.runtime.serving.first_token import (
        compact_runs,
        hand_over_to_vllm,
        start_first_token_server,
    )
    from hydraserve.runtime.serving.stage import start_stage
    from hydraserve.runtime.startup import open_files

    loop = asyncio.get_running_loop()
    timeline = state.timeline
    try:
        files = await loop.run_in_executor(None, open_files, settings, timeline)  # loaderd's read-ahead starts
        opened.append(files)
        imported = loop.run_in_executor(None, import_vllm)
        imported.add_done_callback(lambda _: timeline.mark(Moment.LIBRARIES_IMPORTED))
        model_dir = await loop.run_in_executor(None, prepare_model, settings, files, run_dir / "model")
        timeline.mark(Moment.CONFIG_LOADED)
        await imported
        first_token_engine = "compact" if settings.is_head and compact_runs(settings, files.config()) else "vllm"
        if first_token_engine == "compact":
            server, compact_source = await start_first_token_server(settings, files, model_dir, timeline)
            state.set_serving(server)
            background.append(asyncio.create_task(hand_over_to_vllm(settings, model_dir, server, compact_source,
                                                                    state)))
        elif settings.is_head:
            vllm = await start_server(settings, model_dir, timeline)
            _merge_load_timelines(state, await vllm.load_timelines())
            state.set_serving(vllm)
            if settings.stage is not None and settings.stage.num_stages > 1 and settings.full:
                background.append(asyncio.create_task(consolidate(
                    settings, files, model_dir, vllm, timeline, state.mark_consolidated,
                    first_request=vllm.engine.served, handover_s=settings.handover_s)))
        else:
            stage = await start_stage(settings, model_dir, timeline)
            state.set_serving(stage)
            replica = asyncio.create_task(become_replica(settings, files, model_dir, stage, state, front)) \
                if settings.full else None
            if replica is not None:
                background.append(replica)

            def group_ended(reason: str) -> None:  # from the monitor's thread: its worker exited
                loop.call_soon_threadsafe(_stage_done, state, replica, reason)

            def released() -> None:  # the head released the group (hydraserve_release)
                loop.run_in_executor(None, stage.end)
                _stage_done(state, replica, "the group's head consolidated")

            stage.watch(group_ended)
            loop.add_signal_handler(RELEASED, released)
        timeline.mark(Moment.ENGINE_READY, role="head" if settings.is_head else "stage",
                      first_token_engine=first_token_engine)
        t0 = timeline.events[0].at
        for event in timeline.events:
            front.metrics.startup_phase.labels(event.name).set(event.at - t0)
        log.info("worker ready", extra={"timeline": {e.name: round(e.at - t0, 3) for e in timeline.events}})
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        log.exception("worker failed to start")
        state.set_failed(f"{type(exc).__name__}: {exc}", exc)


def _stage_done(state: ServingState[Any], replica: asyncio.Task[None] | None, reason: str) -> None:
    """The group ended (its head consolidated, or went): a full stage goes on as a replica
    (``become_replica`` serves once built); a partial one's part is over. Said once or twice (the
    head's release, then the worker's exit): the second changes nothing."""
    if state.is_draining or state.consolidated:
        return
    if replica is None:
        log.info("pipeline stage done: %s", reason)
        state.start_draining()
    elif replica.done() and replica.exception() is not None:
        state.set_failed(f"pipeline stage: {reason}; its replica failed: {replica.exception()}")


def _merge_load_timelines(state: ServingState[Any], per_rank: dict[int, list[Any]]) -> None:
    """The engine's loading moments into the worker's timeline: rank 0's as its own, a remote
    pipeline stage's labelled with its stage (the cold start shows every stage's load)."""
    for rank, events in per_rank.items():
        state.timeline.absorb(Timeline(events=events), "worker" if rank == 0 else f"stage{rank}")
