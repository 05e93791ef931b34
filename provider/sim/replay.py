"""HydraServe's trace replay: its generator applied to an Azure Functions 2021 trace.

What the artifact does (scripts/kubernetes/vllm/trace: generate_trace.py, AlpaServe's trace.py
and workload.py; src/result_analyzer.py ``get_requests``), step by step, and what this module
does the same way:

1. Read the trace keyed by ``func`` (not (app, func)), arrivals = end_timestamp - duration,
   functions in order of first appearance in the file.
2. Map trace functions onto the LLM functions in blocks: trace function i goes to entry
   ``n_models * i // n_functions`` of the model list (what its ``map_model(..., "round_robin")``
   computes; the list is ``SimSpec.trace_order``: per application, the 13B copies then the 7B
   copies), so functions that appear early in the trace (the frequent ones) land on chatbot 13B,
   the late, rare ones on summarization.
3. Cut each LLM function's merged arrivals into 600 s intervals of the 14-day trace; in every
   interval with at least two inter-arrival gaps fit a Gamma by maximum likelihood (scipy's
   ``gamma.fit(gaps + 1e-6, floc=0)``: rate = 1/mean gap, shape from ln k - digamma(k) =
   ln(mean) - mean(ln gap)); a fitted rate over 5x the interval's empirical rate is reset to it.
4. Multiply the fitted CV by the scale (Figure 9's "CV" 2/4/8) and draw a *fresh* Gamma
   process per interval: its first arrival is one gap after the interval's start. With a
   large CV most gaps are near zero, so every active interval starts with a burst; this, not
   a stationary process, is the paper's workload.
5. Compress the trace's span (14 days) into the simulated duration (the artifact: /14 into a
   day, /24 into the hour) and keep a uniform random sample of rate x duration requests.

The trace itself is not shipped (it is not reachable from here); ``synthetic_trace`` builds
one with the same shape of data (per-function Poisson arrivals over 14 days, Zipf totals) so
the same pipeline runs without it.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass

import numpy as np

from hydraserve.provider.sim.workload import Arrivals, concat, gamma_renewal, zipf_popularity

TRACE_DAYS = 14
TRACE_SPAN_S = TRACE_DAYS * 86400.0
FIT_INTERVAL_S = 600.0
GAP_EPS = 1e-6  # the artifact adds this to every gap before fitting
RATE_CAP = 5.0  # a fitted rate above RATE_CAP x the empirical rate is reset to the empirical one


@dataclass(frozen=True)
class TraceFunctions:
    """Per trace function, sorted arrival times (s), in order of first appearance."""

    arrivals: tuple[np.ndarray, ...]
    span_s: float = TRACE_SPAN_S

    @property
    def invocations(self) -> int:
        return sum(len(a) for a in self.arrivals)


def read_azure_trace(path: str) -> TraceFunctions:
    """The Azure Functions 2021 CSV (app, func, end_timestamp, duration), keyed as the artifact does."""
    starts: dict[str, list[float]] = {}
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        missing = {"app", "func", "end_timestamp", "duration"} - set(reader.fieldnames or [])
        if missing:
            raise ValueError(f"{path}: missing columns {sorted(missing)} (Azure Functions 2021 format)")
        for line, row in enumerate(reader, start=2):
            try:
                t = float(row["end_timestamp"]) - float(row["duration"])
            except (TypeError, ValueError):
                raise ValueError(f"{path}:{line}: end_timestamp and duration must be numbers") from None
            starts.setdefault(row["func"], []).append(t)
    if not starts:
        raise ValueError(f"{path}: no invocations")
    arrivals = tuple(np.sort(np.asarray(v)) for v in starts.values())
    last = max(float(a[-1]) for a in arrivals)  # the real trace: 14 days, as the artifact assumes
    return TraceFunctions(arrivals=arrivals, span_s=math.floor(last / FIT_INTERVAL_S + 1) * FIT_INTERVAL_S)


def synthetic_trace(n_functions: int = 424, invocations: int = 1_980_951, zipf: float = 1.0,
                    seed: int = 0, span_s: float = TRACE_SPAN_S) -> TraceFunctions:
    """A stand-in with the trace's shape of data: each function a Poisson process over the span,
    totals Zipf over functions (defaults: the 2021 trace's reported size, 1,980,951 invocations in 14
    days). Not real data: the real per-function shares and time patterns are unknown here."""
    rng = np.random.default_rng(seed)
    totals = rng.poisson(zipf_popularity(n_functions, zipf) * invocations)
    per_fn = [np.sort(rng.uniform(0.0, span_s, size=int(n))) for n in totals]
    # first appearance decides the mapping, as in a time-ordered trace file
    order = sorted(range(n_functions), key=lambda i: per_fn[i][0] if len(per_fn[i]) else math.inf)
    return TraceFunctions(arrivals=tuple(per_fn[i] for i in order if len(per_fn[i])), span_s=span_s)


def block_mapping(n_models: int, n_functions: int) -> np.ndarray:
    """LLM function index per trace function (the artifact's ``round_robin``: contiguous blocks)."""
    if n_functions < n_models:
        raise ValueError(f"the trace has {n_functions} functions, fewer than the {n_models} LLM functions "
                         "(HydraServe's mapping needs at least one trace function per LLM function)")
    return (n_models * np.arange(n_functions)) // n_functions


def _digamma(x: np.ndarray) -> np.ndarray:
    """psi(x) for x > 0: recurrence up to x >= 6, then the asymptotic series."""
    x = np.array(x, dtype=float)
    acc = np.zeros_like(x)
    while (small := x < 6.0).any():
        acc[small] -= 1.0 / x[small]
        x[small] += 1.0
    inv2 = 1.0 / (x * x)
    series = inv2 * (1 / 12 - inv2 * (1 / 120 - inv2 * (1 / 252 - inv2 * (1 / 240 - inv2 / 132))))
    return acc + np.log(x) - 0.5 / x - series


def _trigamma(x: np.ndarray) -> np.ndarray:
    x = np.array(x, dtype=float)
    acc = np.zeros_like(x)
    while (small := x < 6.0).any():
        acc[small] += 1.0 / (x[small] * x[small])
        x[small] += 1.0
    inv = 1.0 / x
    inv2 = inv * inv
    series = inv + inv2 / 2 + inv * inv2 * (1 / 6 - inv2 * (1 / 30 - inv2 * (1 / 42 - inv2 / 30)))
    return acc + series


def gamma_shape_mle(s: np.ndarray) -> np.ndarray:
    """Solve ln k - digamma(k) = s (s = ln mean - mean ln > 0) for k: Minka's start, Newton steps."""
    s = np.asarray(s, dtype=float)
    k = (3.0 - s + np.sqrt((s - 3.0) ** 2 + 24.0 * s)) / (12.0 * s)
    for _ in range(6):
        f = np.log(k) - _digamma(k) - s
        df = 1.0 / k - _trigamma(k)
        k = np.maximum(k - f / df, k / 10.0)
    return k


@dataclass(frozen=True)
class IntervalFits:
    """Fitted Gamma per (LLM function, interval) that gets arrivals in the replay."""

    function: np.ndarray
    start_s: np.ndarray
    rate: np.ndarray
    cv: np.ndarray


def fit_intervals(trace: TraceFunctions, n_models: int, order: list[int] | None = None,
                  interval_s: float = FIT_INTERVAL_S) -> IntervalFits:
    """Steps 2-3: block-map, bucket into intervals, MLE Gamma per interval with >= 2 gaps.

    ``order``: the LLM function indices in the order of HydraServe's model list (block b of the
    trace goes to ``order[b]``); default: index order."""
    mapping = block_mapping(n_models, len(trace.arrivals))
    order = list(range(n_models)) if not order else order
    if sorted(order) != list(range(n_models)):
        raise ValueError(f"order must be a permutation of the {n_models} function indices")
    fns, starts, rates, cvs = [], [], [], []
    for block, model in enumerate(order):
        parts = [trace.arrivals[i] for i in np.flatnonzero(mapping == block)]
        t = np.sort(np.concatenate(parts))
        bucket = np.floor(t / interval_s).astype(np.int64)
        same = bucket[1:] == bucket[:-1]
        gaps = np.diff(t)[same] + GAP_EPS
        gap_bucket = bucket[1:][same]
        ids, counts = np.unique(gap_bucket, return_counts=True)
        keep = counts >= 2
        if not keep.any():
            continue
        slot = np.searchsorted(ids, gap_bucket)
        sum_gap = np.bincount(slot, weights=gaps)
        sum_log = np.bincount(slot, weights=np.log(gaps))
        ids, counts, sum_gap, sum_log = ids[keep], counts[keep], sum_gap[keep], sum_log[keep]
        mean = sum_gap / counts
        s = np.log(mean) - sum_log / counts
        ok = s > 1e-12  # identical gaps: no finite MLE (scipy raises; the artifact skips the interval)
        ids, counts, mean, s = ids[ok], counts[ok], mean[ok], s[ok]
        shape = gamma_shape_mle(s)
        rate = 1.0 / mean
        arrivals_in = counts + 1  # arrivals in the interval: gaps + 1
        empirical = arrivals_in / interval_s
        rate = np.where(rate > RATE_CAP * empirical, empirical, rate)
        fns.append(np.full(len(ids), model, dtype=np.int64))
        starts.append(ids * interval_s)
        rates.append(rate)
        cvs.append(np.sqrt(1.0 / shape))
    return IntervalFits(concat(fns, np.int64), concat(starts, float), concat(rates, float), concat(cvs, float))


def replay(fits: IntervalFits, cv_scale: float, rate: float, duration_s: float, seed: int,
           span_s: float = TRACE_SPAN_S, interval_s: float = FIT_INTERVAL_S) -> Arrivals:
    """Steps 4-5: one fresh Gamma process per fitted interval with CV x ``cv_scale``, the span
    compressed into ``duration_s``, then a uniform sample of ``rate x duration_s`` requests."""
    if rate <= 0 or cv_scale <= 0 or duration_s <= 0:
        raise ValueError("rate, cv and duration must be positive")
    rng = np.random.default_rng(seed)
    times, funcs = [], []
    for fn, start, r, cv in zip(fits.function, fits.start_s, fits.rate, fits.cv, strict=True):
        t = gamma_renewal(rng, float(r), float(cv) * cv_scale, interval_s, stationary=False,
                          batch=max(int(r * interval_s * 1.2), 16))
        times.append(start + t)
        funcs.append(np.full(len(t), fn, dtype=np.int64))
    all_t = concat(times, float) * (duration_s / span_s)
    all_f = concat(funcs, np.int64)
    want = int(rate * duration_s)
    if len(all_t) > want:  # get_requests: random.sample of the generated requests
        pick = rng.choice(len(all_t), size=want, replace=False)
        all_t, all_f = all_t[pick], all_f[pick]
    order = np.argsort(all_t, kind="stable")
    return Arrivals(times=all_t[order], functions=all_f[order])


@dataclass(frozen=True)
class ReplayWorkload:
    """HydraServe's workload from a trace: fitted once, replayed per (rate, CV scale, seed)."""

    fits: IntervalFits
    span_s: float = TRACE_SPAN_S

    @classmethod
    def from_trace(cls, trace: TraceFunctions, n_models: int, order: list[int] | None = None) -> ReplayWorkload:
        return cls(fit_intervals(trace, n_models, order), trace.span_s)

    def __call__(self, rate: float, cv: float, duration_s: float, seed: int) -> Arrivals:
        return replay(self.fits, cv, rate, duration_s, seed, self.span_s)
