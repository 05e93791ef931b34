"""Cold-start timeline: named moments of one cold start, reported by each component.

The gateway records the request's arrival and the plan, loaderd the fetch, the worker its own
start-up; the demo merges them (by wall-clock time) into the breakdown it prints. Every moment
is one of :class:`Moment` (a typo is an error where it is marked, not a phase that never shows).
"""

from __future__ import annotations

import time
from enum import StrEnum

from pydantic import BaseModel, Field, PrivateAttr


class Moment(StrEnum):
    """Every moment a component marks, in cold-start order (docs/PROTOCOLS.md walks them)."""

    # the gateway and the backend
    REQUEST_RECEIVED = "request_received"
    POD_PENDING = "pod_pending"  # Kubernetes: the function pod waits for the interceptor
    PLAN_DECIDED = "plan_decided"
    PREFETCH_STARTED = "prefetch_started"
    PREFETCH_SKIPPED = "prefetch_skipped"
    WORKER_SPAWNED = "worker_spawned"
    WEIGHTS_FETCHED = "weights_fetched"  # loaderd holds the stage's bytes
    # a worker's start-up (component "worker", a remote stage's "stage<i>", the compact engine's
    # "compact", vLLM's engine built beside it "vllm")
    PROCESS_STARTED = "process_started"
    HTTP_LISTENING = "http_listening"
    LIBRARIES_IMPORTED = "libraries_imported"
    CONFIG_LOADED = "config_loaded"
    ENGINE_CONFIGURED = "engine_configured"
    WEIGHTS_ATTACHED = "weights_attached"
    LOADERD_FALLBACK = "loaderd_fallback"
    FIRST_TENSOR_LOADED = "first_tensor_loaded"
    WEIGHTS_LOADED = "weights_loaded"
    STAGE_JOINED = "stage_joined"
    ENGINE_STARTED = "engine_started"
    WARMED_UP = "warmed_up"
    GROUP_LINKED = "group_linked"
    ENGINE_READY = "engine_ready"
    HANDED_OVER = "handed_over"  # vLLM's engine took over from the compact engine
    # the gateway again
    INSTANCE_READY = "instance_ready"
    FIRST_RESPONSE_BYTE = "first_response_byte"
    COLD_START_FAILED = "cold_start_failed"
    COLD_START_RETRY = "cold_start_retry"
    # a group's consolidation and its replicas
    CONSOLIDATION_FETCH_STARTED = "consolidation_fetch_started"
    CONSOLIDATION_FETCHED = "consolidation_fetched"
    STANDALONE_STARTED = "standalone_started"
    HANDOVER_DONE = "handover_done"
    CONSOLIDATED = "consolidated"
    CONSOLIDATION_FAILED = "consolidation_failed"
    GROUP_CONSOLIDATED = "group_consolidated"
    REPLICA_BUILT = "replica_built"
    REPLICA_SERVING = "replica_serving"
    REPLICA_READY = "replica_ready"
    REPLICA_FAILED = "replica_failed"


class TimelineEvent(BaseModel):
    """One moment: what happened, when (unix seconds), and by whom."""

    name: str
    at: float
    component: str = "worker"
    detail: dict[str, object] = Field(default_factory=dict)


class Timeline(BaseModel):
    """Ordered events of one cold start (or of one worker's start-up)."""

    events: list[TimelineEvent] = Field(default_factory=list)
    # what is under way now (bytes fetched so far, workers ready), for requests waiting on the
    # cold start; not a moment, so never serialized
    _progress: dict[str, float] = PrivateAttr(default_factory=dict)

    def progress(self, **values: float) -> None:
        """Record how far something under way has come (``weights_fetched_bytes=...``)."""
        self._progress.update(values)

    @property
    def current_progress(self) -> dict[str, float]:
        return dict(self._progress)

    def mark(self, name: Moment, component: str = "worker", at: float | None = None,
             **detail: object) -> TimelineEvent:
        """Record that ``name`` happened now (or at ``at``); ValueError for a name that is no Moment."""
        event = TimelineEvent(name=Moment(name).value, at=time.time() if at is None else at,
                              component=component, detail=detail)
        self.events.append(event)
        return event

    def merged(self, other: Timeline) -> Timeline:
        """Both timelines' events in time order."""
        return Timeline(events=sorted([*self.events, *other.events], key=lambda e: e.at))

    def absorb(self, other: Timeline, component: str) -> None:
        """``other``'s moments into this timeline as ``component``'s (a remote stage's, the engine
        built beside this worker's), kept in time order."""
        self.events.extend(e.model_copy(update={"component": component}) for e in other.events)
        self.events.sort(key=lambda e: e.at)

    def first(self, name: Moment | str) -> TimelineEvent | None:
        return next((e for e in self.events if e.name == name), None)
