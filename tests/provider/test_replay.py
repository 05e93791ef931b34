"""HydraServe's trace replay (provider/sim/replay.py) against its artifact's rules and scipy's fit."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from scipy import stats

from hydraserve.provider.sim.replay import (
    FIT_INTERVAL_S,
    GAP_EPS,
    ReplayWorkload,
    TraceFunctions,
    block_mapping,
    fit_intervals,
    gamma_shape_mle,
    read_azure_trace,
    replay,
    synthetic_trace,
)


@pytest.mark.parametrize("shape", [0.02, 0.3, 1.0, 4.0, 50.0])
def test_gamma_fit_equals_scipy_mle(shape: float) -> None:
    gaps = np.random.default_rng(7).gamma(shape, 3.0, size=40) + GAP_EPS
    a, _, scale = stats.gamma.fit(gaps, floc=0)  # what the artifact calls
    s = np.log(gaps.mean()) - np.log(gaps).mean()
    assert gamma_shape_mle(np.array([s]))[0] == pytest.approx(a, rel=1e-6)
    assert a * scale == pytest.approx(gaps.mean(), rel=1e-6)  # so the fitted rate is 1 / mean gap


def test_block_mapping_is_the_artifacts_round_robin() -> None:
    # map_model(..., "round_robin"): models[n_model * i // n_function]: contiguous blocks
    assert block_mapping(3, 7).tolist() == [0, 0, 0, 1, 1, 2, 2]
    assert block_mapping(4, 4).tolist() == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="fewer than the 5 LLM functions"):
        block_mapping(5, 4)


def trace_of(*functions: list[float], span_s: float = 4 * FIT_INTERVAL_S) -> TraceFunctions:
    return TraceFunctions(arrivals=tuple(np.asarray(f, dtype=float) for f in functions), span_s=span_s)


def test_fits_need_two_gaps_in_an_interval_and_cap_the_rate() -> None:
    trace = trace_of(
        [10.0, 50.0, 120.0, 160.0, 610.0, 620.0, 1300.0],  # interval 0: 4 arrivals; 1: 2; 2: 1
        [1800.0, 1800.5, 1801.2],  # interval 3: 3 arrivals within 1.2 s: fitted rate 1.7/s
    )
    fits = fit_intervals(trace, n_models=2)
    assert fits.function.tolist() == [0, 1] and fits.start_s.tolist() == [0.0, 1800.0]
    assert fits.rate[0] == pytest.approx(1 / 50.0, rel=1e-6)  # 1 / mean gap: under 5 x 4/600
    assert fits.rate[1] == pytest.approx(3 / FIT_INTERVAL_S)  # over 5 x 3/600: reset to empirical
    shape = stats.gamma.fit(np.array([40.0, 70.0, 40.0]) + GAP_EPS, floc=0)[0]
    assert fits.cv[0] == pytest.approx(np.sqrt(1 / shape), rel=1e-6)


def test_identical_gaps_are_skipped_as_the_artifact_skips_them() -> None:
    # no finite MLE: scipy raises (after RuntimeWarnings); the artifact catches it, drops the interval
    with pytest.raises(ValueError), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        stats.gamma.fit(np.array([5.0, 5.0, 5.0]) + GAP_EPS, floc=0)
    fits = fit_intervals(trace_of([0.0, 5.0, 10.0, 15.0], [1.0, 1.0, 1.0]), n_models=2)
    assert len(fits.rate) == 0


def test_replay_starts_each_interval_with_a_burst_and_samples_to_the_rate() -> None:
    rng = np.random.default_rng(3)
    span = 200 * FIT_INTERVAL_S
    trace = trace_of(*[np.sort(rng.uniform(0, span, size=4000)) for _ in range(6)], span_s=span)
    workload = ReplayWorkload.from_trace(trace, n_models=3)
    calm = workload(0.5, 1.0, 3600.0, seed=1)
    bursty = workload(0.5, 8.0, 3600.0, seed=1)
    for arr in (calm, bursty):
        assert len(arr.times) == int(0.5 * 3600)  # get_requests: rate x duration, sampled
        assert arr.times.min() >= 0 and arr.times.max() < 3600 and all(np.diff(arr.times) >= 0)
        assert set(arr.functions.tolist()) == {0, 1, 2}

    def head_share(times: np.ndarray) -> float:
        """Share of arrivals in the first 1 % of their (compressed) fit interval."""
        slot = FIT_INTERVAL_S * 3600.0 / span
        return float(np.mean((times % slot) < 0.01 * slot))

    # fresh Gamma processes per interval: with CV x 8 a burst opens every interval (0.18 of all
    # arrivals land in its first 1 %); with CV x 1 (fitted CV ~ 1 for Poisson data) they spread
    assert head_share(bursty.times) > 0.1
    assert head_share(calm.times) < 0.03


def test_replay_is_deterministic_for_a_seed_and_rejects_bad_parameters() -> None:
    fits = fit_intervals(synthetic_trace(n_functions=12, invocations=20000, seed=2), n_models=4)
    a = replay(fits, 4.0, 0.3, 1800.0, seed=9)
    b = replay(fits, 4.0, 0.3, 1800.0, seed=9)
    assert np.array_equal(a.times, b.times) and np.array_equal(a.functions, b.functions)
    with pytest.raises(ValueError):
        replay(fits, 0.0, 0.3, 1800.0, seed=9)


def test_read_azure_trace_keys_by_func_in_order_of_first_appearance(tmp_path) -> None:
    path = tmp_path / "trace.csv"
    path.write_text("app,func,end_timestamp,duration\n"
                    "a1,fB,100.5,0.5\n"
                    "a1,fA,50.0,10.0\n"
                    "a2,fB,30.0,1.0\n"  # same func id in another app: merged, as the artifact does
                    "a1,fA,2000.0,0.0\n")
    trace = read_azure_trace(str(path))
    assert [a.tolist() for a in trace.arrivals] == [[29.0, 100.0], [40.0, 2000.0]]
    assert trace.span_s == 4 * FIT_INTERVAL_S  # the last arrival's interval, rounded up
    bad = tmp_path / "bad.csv"
    bad.write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="missing columns"):
        read_azure_trace(str(bad))
    bad.write_text("app,func,end_timestamp,duration\na,f,soon,1\n")
    with pytest.raises(ValueError, match=r"bad.csv:2: end_timestamp and duration must be numbers"):
        read_azure_trace(str(bad))
    bad.write_text("app,func,end_timestamp,duration\n")
    with pytest.raises(ValueError, match="no invocations"):
        read_azure_trace(str(bad))


def test_synthetic_trace_has_the_real_ones_size_and_first_appearance_order() -> None:
    trace = synthetic_trace(seed=1)
    assert len(trace.arrivals) == 424 and trace.span_s == 14 * 86400
    assert trace.invocations == pytest.approx(1_980_951, rel=0.01)
    firsts = [a[0] for a in trace.arrivals]
    assert firsts == sorted(firsts)


def test_blocks_go_to_the_functions_in_the_artifacts_model_list_order() -> None:
    from hydraserve.provider.sim.spec import paper_testbed
    spec = paper_testbed(copies=3, applications=True)
    names = [spec.functions[i].name for i in spec.trace_order]
    # generate_trace.py: per application, the 13B copies, then the 7B copies
    assert names[:6] == ["chatbot-llama2-13b-0", "chatbot-llama2-13b-1", "chatbot-llama2-13b-2",
                         "chatbot-llama2-7b-0", "chatbot-llama2-7b-1", "chatbot-llama2-7b-2"]
    assert names[-1] == "summarization-llama2-7b-2" and sorted(spec.trace_order) == list(range(18))
    busy, quiet = [1.0, 2.5, 4.5, 7.0], [100.0, 103.0, 104.0]
    fits = fit_intervals(trace_of(busy, quiet), n_models=2, order=[1, 0])
    assert fits.function.tolist() == [1, 0]  # the first trace function lands on order[0] = 1
    with pytest.raises(ValueError, match="permutation"):
        fit_intervals(trace_of(busy, quiet), n_models=2, order=[1, 1])
