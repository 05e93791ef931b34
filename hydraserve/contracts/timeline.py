"""Cold-start timeline: named moments of one cold start, reported by each component.

The gateway records the request's arrival and the plan, loaderd the fetch, the worker its own
start-up; the demo merges them (by wall-clock time) into the breakdown it prints.
"""

from __future__ import annotations

import time

from pydantic import BaseModel, Field


class TimelineEvent(BaseModel):
    """One moment: what happened, when (unix seconds), and by whom."""

    name: str
    at: float
    component: str = "worker"
    detail: dict[str, object] = Field(default_factory=dict)


class Timeline(BaseModel):
    """Ordered events of one cold start (or of one worker's start-up)."""

    events: list[TimelineEvent] = Field(default_factory=list)

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
