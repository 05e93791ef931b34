"""The timeline's moments are one enum: a name no component marks by mistake, each documented."""

from __future__ import annotations

from pathlib import Path

import pytest

from hydraserve.contracts.timeline import Moment, Timeline

PROTOCOLS = Path(__file__).resolve().parents[2] / "docs" / "PROTOCOLS.md"


def test_a_moment_that_is_not_one_is_refused_where_it_is_marked() -> None:
    timeline = Timeline()
    timeline.mark(Moment.ENGINE_READY, role="head")
    timeline.mark("warmed_up")  # type: ignore[arg-type]  # a plain string that names a moment is one
    with pytest.raises(ValueError, match="engine_redy"):
        timeline.mark("engine_redy")  # type: ignore[arg-type]
    assert [e.name for e in timeline.events] == ["engine_ready", "warmed_up"]
    assert timeline.first(Moment.WARMED_UP) is timeline.events[1]


def test_every_moment_is_in_the_walk_through_of_a_cold_start() -> None:
    text = PROTOCOLS.read_text()
    assert [m.value for m in Moment if f"`{m.value}" not in text] == []
