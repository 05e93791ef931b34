"""The function worker process: listen first, then import, attach weights and load, overlapped.

Order (each step marked on the start-up timeline):
1. process_started (from /proc) -> http_listening: the server answers /healthz at once, so the
   platform sees a live process while the slow parts run; requests wait (bounded) for ready.
2. In a loader thread: libraries_imported (torch, the engine) -> weights_attached (loaderd's
   shared-memory segment, whose fetch began at placement time, or S3 directly if no daemon
   answers) -> weights_loaded (each layer built as soon as its tensors landed) ->
   engine_ready. Meanwhile loaderd keeps the link busy: fetch and start-up overlap.
3. SIGTERM: readiness off, in-flight requests finish, the engine stops, the process exits.
Started by provider backends (`python -m hydraserve.runtime.worker`, settings in the env) or
by `hydraserve serve`.
"""

from __future__ import annotations

import logging
import sys
import threading

from hydraserve.http_server import DrainingServer, serve_until_signalled
from hydraserve.logs import configure_logging
from hydraserve.runtime.proc_clock import process_start_time
from hydraserve.runtime.server.app import create_app
from hydraserve.runtime.server.metrics import RuntimeMetrics
from hydraserve.runtime.server.state import RuntimeState
from hydraserve.runtime.settings import WorkerSettings

log = logging.getLogger("hydraserve.worker")


def _load(settings: WorkerSettings, state: RuntimeState, metrics: RuntimeMetrics) -> None:
    try:
        from hydraserve.runtime.loader_files import LoaderModelFiles

        def fell_back(reason: str) -> None:
            state.timeline.mark("loaderd_fallback", reason=reason)

        early = None
        if settings.model_uri.startswith("s3://") and settings.loaderd_url:
            # config and tokenizer come from loaderd while torch imports (no S3 client here)
            early = LoaderModelFiles(settings.model_uri, settings.loaderd_url, settings.loaderd_token or "",
                                     endpoint_url=settings.s3_endpoint_url, stage=settings.stage,
                                     on_fallback=fell_back)
        from hydraserve.runtime import startup  # imports torch: the "libraries" phase

        state.timeline.mark("libraries_imported")
        engine = startup.load_engine(settings, state.timeline, early)
        state.set_engine(engine)
        state.timeline.mark("engine_ready")
        t0 = state.timeline.events[0].at
        for event in state.timeline.events:
            metrics.startup_phase.labels(event.name).set(event.at - t0)
        log.info("worker ready", extra={"timeline": {e.name: round(e.at - t0, 3)
                                                     for e in state.timeline.events}})
    except Exception as exc:
        log.exception("worker failed to start")
        state.set_failed(f"{type(exc).__name__}: {exc}")


def run_worker(settings: WorkerSettings) -> int:
    state = RuntimeState(settings.function_name, settings.revision)
    # /proc's start time has 10 ms ticks: never report a start before the spawn itself.
    state.timeline.mark("process_started", at=max(process_start_time(), settings.spawned_at or 0.0))
    metrics = RuntimeMetrics()
    server = DrainingServer(create_app(state, metrics=metrics), settings.host, settings.port).start()
    state.timeline.mark("http_listening", port=server.port)
    log.info("listening", extra={"url": server.url, "model": settings.model_uri})
    threading.Thread(target=_load, args=(settings, state, metrics), name="loader", daemon=True).start()

    def stop_engine() -> None:
        engine = state.engine_or_none()
        if engine is not None:
            engine.shutdown(drain=False, timeout=5)

    serve_until_signalled(server, on_drain=state.start_draining, wait_idle=state.wait_idle,
                          drain_timeout_s=settings.drain_timeout_s, on_stop=stop_engine)
    log.info("stopped")
    return 0


def main() -> int:
    configure_logging("worker")
    return run_worker(WorkerSettings.from_env())


if __name__ == "__main__":
    sys.exit(main())
