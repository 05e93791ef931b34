"""Stage balancing, the fair-share NIC model and calibration."""

from __future__ import annotations

import random

import pytest

from hydraserve.provider.calibration import Calibration, fit_startup
from hydraserve.provider.network import Nic
from hydraserve.provider.stages import balanced_boundaries, balanced_stage_plan


@pytest.mark.parametrize("seed", range(20))
def test_balanced_split_is_optimal_against_brute_force(seed: int) -> None:
    rng = random.Random(seed)
    n = rng.randint(2, 9)
    layers = tuple(rng.randint(1, 50) for _ in range(n))
    first, last = rng.randint(0, 60), rng.randint(0, 60)
    import itertools
    for p in range(1, min(4, n) + 1):
        got = balanced_boundaries(layers, first, last, p)
        assert got[0] == 0 and got[-1] == n and all(a < b for a, b in itertools.pairwise(got))

        def worst(bounds: list[int]) -> int:
            sizes = [sum(layers[bounds[i]:bounds[i + 1]]) for i in range(len(bounds) - 1)]
            sizes[0] += first
            sizes[-1] += last
            return max(sizes)
        best = min(worst([0, *c, n]) for c in itertools.combinations(range(1, n), p - 1))
        assert worst(got) == best
    assert balanced_stage_plan(list(layers), first, last, 1).stages[0].layer_end == n


def test_fair_share_finish_times_and_advance() -> None:
    nic = Nic(bps=10.0)
    nic.add("a", 10.0, deadline=100, now=0.0)
    nic.add("b", 30.0, deadline=100, now=0.0)
    ends, _ = nic.finish_times(0.0)
    assert ends == {"a": pytest.approx(2.0), "b": pytest.approx(4.0)}  # a at 5 b/s, then b alone
    nic.advance(3.0)
    assert "a" not in nic.fetches and nic.fetches["b"].remaining_bits == pytest.approx(10.0)
    assert nic.drain_finished()[0][1] == pytest.approx(2.0)


def test_admission_refuses_a_fetch_that_breaks_a_deadline() -> None:
    nic = Nic(bps=10.0)
    nic.add("a", 20.0, deadline=2.5, now=0.0)
    ok, _, broken = nic.admit(0.0, 20.0)
    assert not ok and broken == "a"
    ok, _, _ = nic.admit(0.0, 2.0)  # a small one: a ends at 2.2 s
    assert ok


def test_startup_fit_recovers_overlap_and_tail() -> None:
    rng = random.Random(0)
    samples = []
    for _ in range(60):
        f, g = rng.uniform(0.5, 12), rng.choice([3.4, 6.75, 13.5])
        samples.append((f, g, max(f, 4.5) + 1.8 + 0.1 * g + rng.gauss(0, 0.05)))
    model = fit_startup(samples)
    assert model.overlap_s == pytest.approx(4.5, abs=0.35) and model.tail_s == pytest.approx(1.8, abs=0.2)
    assert model.per_gb_s == pytest.approx(0.1, abs=0.03)


def test_calibration_learns_bandwidth_and_keeps_prior_until_samples() -> None:
    cal = Calibration()
    assert cal.predict_startup(3.0) == pytest.approx(5.0)  # HydraServe prior: fetch + 2 s
    for _ in range(20):
        cal.observe_fetch("n1", bits=8e9, seconds=1.0, sharing=1.0, configured_bps=16e9)
    assert cal.bandwidth_bps("n1", 16e9) == pytest.approx(8e9, rel=0.01)
    static = Calibration(enabled=False)
    static.observe_fetch("n1", bits=8e9, seconds=1.0, sharing=1.0, configured_bps=16e9)
    assert static.bandwidth_bps("n1", 16e9) == 16e9


def test_background_fetches_yield_to_cold_start_fetches() -> None:
    nic = Nic(bps=10.0)
    nic.add("consolidate", 100.0, deadline=float("inf"), now=0.0, background=True)
    nic.advance(2.0)  # alone: full rate
    assert nic.fetches["consolidate"].remaining_bits == pytest.approx(80.0)
    nic.add("cold", 20.0, deadline=4.0 + 1e-9, now=2.0)
    assert nic.admit(2.0, 0.0)[0] and nic.finish_times(2.0)[0] == {"cold": pytest.approx(4.0)}
    assert len(nic) == 1  # only the cold start counts for sharing
    nic.advance(4.0)  # the cold start had the whole NIC; the background one waited
    assert "cold" not in nic.fetches and nic.fetches["consolidate"].remaining_bits == pytest.approx(80.0)
    assert nic.next_finish(4.0) == pytest.approx(12.0)
