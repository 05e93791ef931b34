"""Arrivals for the simulator: the Azure Functions 2021 trace format or a synthetic generator.

As HydraServe did, the trace supplies which functions are popular, and the arrival process is
rescaled. HydraServe's generator (its artifact, scripts/kubernetes/vllm/trace: trace.py
``Trace.replay(..., arrival_distribution="gamma")``, from AlpaServe) fits a Gamma process *per
function* and samples each function independently; the CV is that of each function's own
inter-arrival times, and the merged stream is then thinned uniformly to the target aggregate
rate. So by default (``per_function=True``) each LLM function i is an independent Gamma renewal
process of rate ``rate x share_i`` and the target CV (shape 1/CV^2): a burst is many requests to
one function, not one burst spread over all functions. ``per_function=False`` keeps the older
model (one aggregate Gamma stream, each arrival assigned a function by popularity), which
dilutes each function's CV towards 1 and synchronises bursts across functions.
Trace functions are ranked by invocation count and mapped onto the LLM functions in rank order
(the i-th most popular trace function is LLM function i). The trace CSV has a header with at
least app, func, end_timestamp, duration.
"""

from __future__ import annotations

import csv
from collections import Counter
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Arrivals:
    times: np.ndarray  # seconds from 0, sorted
    functions: np.ndarray  # index into the function list per arrival


def azure_popularity(path: str, n_functions: int) -> np.ndarray:
    """Invocation shares of the ``n_functions`` most invoked (app, func) pairs of the trace."""
    counts: Counter[tuple[str, str]] = Counter()
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        missing = {"app", "func", "end_timestamp", "duration"} - set(reader.fieldnames or [])
        if missing:
            raise ValueError(f"{path}: missing columns {sorted(missing)} (Azure Functions 2021 format)")
        for row in reader:
            counts[(row["app"], row["func"])] += 1
    if not counts:
        raise ValueError(f"{path}: no invocations")
    top = [c for _, c in counts.most_common(n_functions)]
    top += [min(top)] * (n_functions - len(top))  # fewer trace functions than LLM functions
    weights = np.asarray(top, dtype=float)
    return weights / weights.sum()


def zipf_popularity(n_functions: int, exponent: float = 1.0) -> np.ndarray:
    """Synthetic skew: share of rank i proportional to 1/i^exponent."""
    w = 1.0 / np.arange(1, n_functions + 1) ** exponent
    return w / w.sum()


def _gamma_renewal(rng: np.random.Generator, rate: float, cv: float, duration_s: float) -> np.ndarray:
    """Arrival times in [0, duration_s) of a stationary Gamma renewal process.

    Stationary: the first arrival is the residual of a length-biased gap (U x Gamma(shape + 1)),
    so the hour is a window of a process already running. Starting with a fresh gap instead
    would add (CV^2 - 1)/2 arrivals per process at t = 0 (31 per function at CV 8, more than
    the rate itself for most of 128 functions).
    """
    shape = 1.0 / (cv * cv)
    scale = 1.0 / (rate * shape)
    n_guess = int(rate * duration_s * 1.2 + 50 * cv + 100)
    gaps = rng.gamma(shape, scale, size=n_guess)
    gaps[0] = rng.uniform() * rng.gamma(shape + 1.0, scale)
    times = np.cumsum(gaps)
    while times[-1] < duration_s:  # rare with the margin above
        more = np.cumsum(rng.gamma(shape, scale, size=n_guess)) + times[-1]
        times = np.concatenate([times, more])
    return times[times < duration_s]


def gamma_arrivals(popularity: np.ndarray, rate: float, cv: float, duration_s: float, seed: int,
                   per_function: bool = True, oversample: float = 1.0) -> Arrivals:
    """Gamma arrivals of ``rate`` req/s in aggregate and ``cv`` over ``duration_s``.

    ``per_function``: each function an independent Gamma process of rate ``rate x share`` and
    CV ``cv`` (HydraServe's generator); else one aggregate Gamma stream split by popularity.
    """
    if rate <= 0 or cv <= 0 or duration_s <= 0:
        raise ValueError("rate, cv and duration must be positive")
    rng = np.random.default_rng(seed)
    if not per_function:
        times = _gamma_renewal(rng, rate, cv, duration_s)
        funcs = rng.choice(len(popularity), size=len(times), p=popularity)
        return Arrivals(times=times, functions=funcs)
    parts_t, parts_f = [], []
    for fn, share in enumerate(popularity):
        if share <= 0:
            continue
        t = _gamma_renewal(rng, rate * oversample * float(share), cv, duration_s)
        if oversample > 1.0:  # HydraServe samples the generated requests down to the target rate
            t = t[rng.uniform(size=len(t)) < 1.0 / oversample]
        parts_t.append(t)
        parts_f.append(np.full(len(t), fn, dtype=np.int64))
    times = np.concatenate(parts_t) if parts_t else np.zeros(0)
    funcs = np.concatenate(parts_f) if parts_f else np.zeros(0, dtype=np.int64)
    order = np.argsort(times, kind="stable")
    return Arrivals(times=times[order], functions=funcs[order])


def write_sample_trace(path: str, n_funcs: int = 40, invocations: int = 2000, seed: int = 0) -> None:
    """A small CSV in the Azure Functions 2021 format (tests and examples; not real data)."""
    rng = np.random.default_rng(seed)
    pop = zipf_popularity(n_funcs, 1.2)
    which = rng.choice(n_funcs, size=invocations, p=pop)
    ends = np.sort(rng.uniform(0, 3600, size=invocations))
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["app", "func", "end_timestamp", "duration"])
        for fn, end in zip(which, ends, strict=True):
            w.writerow([f"app{fn % 7}", f"func{fn}", f"{end:.3f}", f"{rng.exponential(0.5):.3f}"])
