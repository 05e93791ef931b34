"""Print a cold-start timeline as a table and a phase breakdown (demo, up, benchmarks)."""

from __future__ import annotations

from typing import Any

from hydraserve.contracts.timeline import Moment, Timeline

# (phase name, from event, to event): the breakdown a reader wants, in cold-start order.
PHASES: list[tuple[str, Moment, Moment]] = [
    ("placement", Moment.REQUEST_RECEIVED, Moment.PLAN_DECIDED),
    ("placement (Kubernetes: from the function pod pending)", Moment.POD_PENDING, Moment.PLAN_DECIDED),
    ("fetch (loaderd, S3 -> shared memory)", Moment.PREFETCH_STARTED, Moment.WEIGHTS_FETCHED),
    ("process start -> listening", Moment.PROCESS_STARTED, Moment.HTTP_LISTENING),
    ("library import (vLLM; a pooled process did it already)", Moment.HTTP_LISTENING, Moment.LIBRARIES_IMPORTED),
    ("config + tokenizer (read while the libraries import)", Moment.HTTP_LISTENING, Moment.CONFIG_LOADED),
    ("engine set-up before the weights (processes, model built)", Moment.CONFIG_LOADED, Moment.WEIGHTS_ATTACHED),
    ("weights load (after attach)", Moment.WEIGHTS_ATTACHED, Moment.WEIGHTS_LOADED),
    ("KV cache, engine ready, warm-up", Moment.WEIGHTS_LOADED, Moment.WARMED_UP),
    ("ready -> first response byte", Moment.INSTANCE_READY, Moment.FIRST_RESPONSE_BYTE),
    ("total (Kubernetes): pod pending -> group ready", Moment.POD_PENDING, Moment.INSTANCE_READY),
    ("total: request -> first response byte", Moment.REQUEST_RECEIVED, Moment.FIRST_RESPONSE_BYTE),
]


def phase_durations(timeline: Timeline) -> dict[str, float]:
    """Seconds of each phase whose two events both happened."""
    out: dict[str, float] = {}
    for name, start, end in PHASES:
        a, b = timeline.first(start), timeline.first(end)
        if a is not None and b is not None:
            out[name] = round(b.at - a.at, 3)
    return out


def format_timeline(timeline: Timeline) -> str:
    """One line per event, relative to the first, plus the phase breakdown."""
    if not timeline.events:
        return "(no timeline)"
    t0 = timeline.events[0].at
    lines = ["  time      component  event"]
    for e in sorted(timeline.events, key=lambda e: e.at):
        detail = " ".join(f"{k}={v}" for k, v in e.detail.items())
        lines.append(f"  +{e.at - t0:7.3f} s  {e.component:<10} {e.name:<22} {detail}".rstrip())
    lines.append("")
    lines.append("  phase                                      seconds")
    for name, seconds in phase_durations(timeline).items():
        lines.append(f"  {name:<42} {seconds:7.3f}")
    overlap = fetch_overlap(timeline)
    if overlap is not None:
        lines.append(f"  {'fetch overlapping worker start-up':<42} {overlap:7.3f}")
    return "\n".join(lines)


def fetch_overlap(timeline: Timeline) -> float | None:
    """Seconds during which the fetch and the worker's start-up ran at the same time."""
    fetch_a, fetch_b = timeline.first(Moment.PREFETCH_STARTED), timeline.first(Moment.WEIGHTS_FETCHED)
    start_a, start_b = timeline.first(Moment.WORKER_SPAWNED), timeline.first(Moment.ENGINE_READY)
    if None in (fetch_a, fetch_b, start_a, start_b):
        return None
    assert fetch_a and fetch_b and start_a and start_b
    return round(max(0.0, min(fetch_b.at, start_b.at) - max(fetch_a.at, start_a.at)), 3)


def summary(timeline: Timeline) -> dict[str, Any]:
    """The machine-readable breakdown (last JSON line of the demo)."""
    events: dict[str, float] = {}
    for e in timeline.events:  # the first of each (a group's stages repeat the worker events)
        events.setdefault(e.name, round(e.at - timeline.events[0].at, 3))
    return {"phases_s": phase_durations(timeline), "fetch_overlap_s": fetch_overlap(timeline), "events": events}
