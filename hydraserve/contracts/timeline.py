"""Cold-start timeline: named moments of one cold start, reported by each component.

The gateway records the request's arrival and the plan, loaderd the fetch, the worker its own
start-up; the demo merges them (by wall-clock time) into the breakdown it prints.
"""

from __future__ import annotations

import time

from pydantic import BaseModel, Field, PrivateAttr


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

    def mark(self, name: str, component: str = "worker", at: float | None = None,
             **detail: object) -> TimelineEvent:
        """Record that ``name`` happened now (or at ``at``)."""
        event = TimelineEvent(name=name, at=time.time() if at is None else at,
                              component=component, detail=detail)
        self.events.append(event)
        return event

    def merged(self, other: Timeline) -> Timeline:
        """Both timelines' events in time order."""
        return Timeline(events=sorted([*self.events, *other.events], key=lambda e: e.at))

    def first(self, name: str) -> TimelineEvent | None:
        return next((e for e in self.events if e.name == name), None)
