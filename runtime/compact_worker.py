"""The function worker process on our compact engine: listen first, then import, attach weights and load, overlapped.

Order (each step marked on the start-up timeline):
1. process_started (from /proc) -> http_listening: the server answers /healthz at once, so the
   platform sees a live process while the slow parts run; requests wait (bounded) for ready.
2. In a loader thread: the model's files are opened (through loaderd: config, tokenizer and the
   index are read ahead while torch imports) -> libraries_imported -> load my stage
   (runtime/startup.py: config_loaded -> weights_attached, loaderd's segments whose fetch began
   at placement, or S3 if no daemon answers -> weights_loaded, each layer built as its tensors
   land) -> wire my role (runtime/roles.py: the head's engine and warm-up, or an inner stage's
   KV cache) -> engine_ready. Meanwhile loaderd keeps the link busy: fetch and start-up overlap.
3. SIGTERM: readiness off, in-flight requests finish, the engine stops, the process exits.
Started through hydraserve.runtime.worker for ``engine=compact``.
"""

from __future__ import annotations

import logging
import socket
import threading
from typing import TYPE_CHECKING

from hydraserve.contracts.worker import WorkerEnvironment
from hydraserve.http_server import DrainingServer, serve_until_signalled
from hydraserve.runtime.proc_clock import process_start_time
from hydraserve.runtime.server.app import create_app
from hydraserve.runtime.server.metrics import RuntimeMetrics
from hydraserve.runtime.server.state import RuntimeState

if TYPE_CHECKING:
    from hydraserve.runtime.replica import ReplicaBuilder
    from hydraserve.runtime.transport.link import StageLink
    from hydraserve.weights.model_files import ModelFiles

log = logging.getLogger("hydraserve.worker")


def _load(settings: WorkerEnvironment, state: RuntimeState, metrics: RuntimeMetrics,
          listener: socket.socket | None, opened: list[ModelFiles]) -> None:
    try:
        from hydraserve.runtime.startup import load_my_stage, open_files

        files = open_files(settings, state.timeline)  # loaderd's read-ahead starts now
        opened.append(files)
        from hydraserve.runtime.engine.engine import LLMEngine  # imports torch: the "libraries" phase
        from hydraserve.runtime.roles import role_for

        state.timeline.mark("libraries_imported")
        role = role_for(settings, listener, on_broken=lambda reason: state.set_failed(f"pipeline group: {reason}"),
                        on_consolidated=state.mark_consolidated)
        loaded = load_my_stage(settings, files, state.timeline, role.prepare)
        serving = role.wire(loaded, state.timeline)
        if isinstance(serving, LLMEngine):
            state.set_engine(serving)
        else:  # an inner stage: its link serves the ring until the group ends
            state.set_stage(serving)
            threading.Thread(target=_serve_link, args=(serving, state, getattr(role, "replica", None),
                                                       settings.link_timeout_s),
                             name="stage-link", daemon=True).start()
        state.timeline.mark("engine_ready", role=role.name)
        t0 = state.timeline.events[0].at
        for event in state.timeline.events:
            metrics.startup_phase.labels(event.name).set(event.at - t0)
        log.info("worker ready", extra={"role": role.name, "timeline": {e.name: round(e.at - t0, 3)
                                                                        for e in state.timeline.events}})
    except Exception as exc:
        log.exception("worker failed to start")
        state.set_failed(f"{type(exc).__name__}: {exc}", exc)


def _serve_link(link: StageLink, state: RuntimeState, replica: ReplicaBuilder | None, build_timeout_s: float) -> None:
    """Serve the ring until it ends; released (the head consolidated): a full stage goes on as a
    standalone replica (its status says consolidated), a partial one's part is over (it drains)."""
    link.run()
    if not link.released:
        if replica is not None:
            replica.stop()
        state.set_failed(f"pipeline group: {link.failed or 'the ring was closed'}")
        return
    engine = replica.take_over(build_timeout_s) if replica is not None else None
    if engine is not None and state.is_draining:  # SIGTERM came meanwhile: the worker stops
        replica.stop()  # type: ignore[union-attr]
        engine = None
    if engine is None:
        state.start_draining()
        return
    state.stage_runner = None  # its ring's KV cache goes
    state.set_engine(engine)
    state.mark_consolidated()
    state.timeline.mark("replica_serving")
    log.info("serving as a standalone replica")


def run_worker(settings: WorkerEnvironment, *, adopted_at: float | None = None) -> int:
    """Serve as ``settings`` says until SIGTERM; ``adopted_at``: this process is a pooled one
    (runtime/forkserver.py) handed its work then, its imports already done."""
    state = RuntimeState(settings.function, settings.revision)
    if adopted_at is not None:
        state.timeline.mark("process_started", at=adopted_at, adopted=True,
                            pooled_s=round(adopted_at - process_start_time(), 3))
    else:  # /proc's start time has 10 ms ticks: never report a start before the spawn itself
        state.timeline.mark("process_started", at=max(process_start_time(), settings.spawned_at or 0.0))
    metrics = RuntimeMetrics()
    server = DrainingServer(create_app(state, metrics=metrics, api=settings.is_head or settings.full), settings.host,
                            settings.port).start()
    state.timeline.mark("http_listening", port=server.port)
    listener = None
    if settings.stage is not None and settings.stage.num_stages > 1 and settings.transport_port:
        from hydraserve.runtime.transport.link import listen  # peers may link before the model is in

        listener = listen(f"{settings.host}:{settings.transport_port}")
    log.info("listening", extra={"url": server.url, "model": settings.model_uri, "instance": settings.instance_id,
                                 "stage": settings.stage.model_dump() if settings.stage else "whole",
                                 "full": settings.full, "peers": settings.peers})
    opened: list[ModelFiles] = []
    threading.Thread(target=_load, args=(settings, state, metrics, listener, opened), name="loader",
                     daemon=True).start()

    def stop_engine() -> None:
        engine = state.engine_or_none()
        if engine is not None:
            engine.shutdown(drain=False, timeout=5)
            close = getattr(getattr(engine, "executor", None), "close", None)
            if close is not None:  # a group's head: the ring ends, the inner stages see it
                close()
        for files in opened:
            files.release_leases()

    serve_until_signalled(server, on_drain=state.start_draining, wait_idle=state.wait_idle,
                          drain_timeout_s=settings.drain_timeout_s, on_stop=stop_engine)
    log.info("stopped")
    return 0
