"""The hybrid histogram keep-alive policy on synthetic idle-time distributions: periodic,
bursty, spread out, too little history, mostly beyond the range."""

from __future__ import annotations

import random

import pytest

from hydraserve.provider.keepalive import IdleHistogram, PolicySettings, decide


def histogram(idle_times: list[float], **kw: float) -> IdleHistogram:
    hist = IdleHistogram(**kw)
    for t in idle_times:
        hist.observe(t)
    return hist


def test_a_periodic_function_is_prewarmed_just_before_its_next_call_and_kept_past_it() -> None:
    rng = random.Random(1)
    idle = [600 + rng.uniform(-30, 30) for _ in range(200)]  # every 10 min, +-30 s
    decision = decide(histogram(idle))
    assert decision.reason == "histogram"
    assert 480 <= decision.prewarm_s < 570  # loaded before the earliest arrivals
    assert 660 <= decision.unload_at_s <= 750  # kept past the latest
    assert all(decision.prewarm_s <= t <= decision.unload_at_s for t in idle)  # every call warm


def test_a_bursty_function_stays_loaded_through_its_bursts() -> None:
    rng = random.Random(2)
    idle = [rng.uniform(0, 20) for _ in range(300)] + [rng.uniform(1800, 1900) for _ in range(10)]
    decision = decide(histogram(idle))
    assert decision.reason == "histogram" and decision.prewarm_s == 0  # no gap worth unloading for
    assert decision.keep_alive_s >= 60  # covers the burst's idle times


def test_too_little_history_falls_back_to_the_fixed_keep_alive() -> None:
    decision = decide(histogram([600.0] * 5), PolicySettings(fixed_keep_alive_s=45))
    assert (decision.prewarm_s, decision.keep_alive_s, decision.reason) == (0.0, 45, "too_little_history")


def test_idle_times_mostly_beyond_the_range_fall_back_too() -> None:
    decision = decide(histogram([5 * 3600.0] * 30 + [60.0] * 10))
    assert decision.reason == "out_of_range" and decision.prewarm_s == 0


def test_idle_times_spread_over_the_range_keep_the_function_for_the_whole_range() -> None:
    rng = random.Random(3)
    decision = decide(histogram([rng.uniform(0, 4 * 3600) for _ in range(2000)]))
    assert decision.reason == "no_pattern"
    assert (decision.prewarm_s, decision.keep_alive_s) == (0.0, 4 * 3600.0)


def test_negative_idle_times_are_refused() -> None:
    with pytest.raises(ValueError):
        IdleHistogram().observe(-1)
