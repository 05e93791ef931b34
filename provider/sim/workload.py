"""Synthetic arrivals: stationary Gamma processes over Zipf shares (the simpler workload).

HydraServe's own workload is its trace replay (``replay.py``): per-interval Gamma fits of the
Azure trace, restarted every 10 trace minutes, compressed and sampled. This module is the
simpler model kept beside it: each LLM function i an independent, stationary Gamma renewal
process of rate ``rate x share_i`` and the target CV (``per_function=True``), or one aggregate
Gamma stream whose arrivals are given functions by popularity (``per_function=False``, which
dilutes each function's CV towards 1 and synchronises bursts across functions). Optionally
generated at ``oversample`` times the rate and thinned back, as HydraServe's sampling does.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Arrivals:
    times: np.ndarray  # seconds from 0, sorted
    functions: np.ndarray  # index into the function list per arrival


def zipf_popularity(n_functions: int, exponent: float = 1.0) -> np.ndarray:
    """Synthetic skew: share of rank i proportional to 1/i^exponent."""
    w = 1.0 / np.arange(1, n_functions + 1) ** exponent
    return w / w.sum()


def gamma_renewal(rng: np.random.Generator, rate: float, cv: float, duration_s: float,
                  stationary: bool = True, batch: int | None = None) -> np.ndarray:
    """Arrival times in [0, duration_s) of a Gamma renewal process (shape 1/CV^2), gaps drawn
    ``batch`` at a time.

    ``stationary``: the first arrival is the residual of a length-biased gap (U x Gamma(shape + 1)),
    so the window is part of a process already running; starting with a fresh gap instead adds
    (CV^2 - 1)/2 arrivals at t = 0 (31 at CV 8). HydraServe's replay wants exactly that: it
    starts a fresh process every fitted interval (``replay.py``).
    """
    shape = 1.0 / (cv * cv)
    scale = 1.0 / (rate * shape)
    if batch is None:
        batch = int(rate * duration_s * 1.2 + 50 * cv + 100)  # rarely needs a second draw
    gaps = rng.gamma(shape, scale, size=batch)
    if stationary:
        gaps[0] = rng.uniform() * rng.gamma(shape + 1.0, scale)
    times = np.cumsum(gaps)
    while times[-1] < duration_s:
        more = np.cumsum(rng.gamma(shape, scale, size=batch)) + times[-1]
        times = np.concatenate([times, more])
    return times[times < duration_s]


def concat(parts: list[np.ndarray], dtype: type) -> np.ndarray:
    """np.concatenate that also takes no parts."""
    return np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)


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
        times = gamma_renewal(rng, rate, cv, duration_s)
        funcs = rng.choice(len(popularity), size=len(times), p=popularity)
        return Arrivals(times=times, functions=funcs)
    parts_t, parts_f = [], []
    for fn, share in enumerate(popularity):
        if share <= 0:
            continue
        t = gamma_renewal(rng, rate * oversample * float(share), cv, duration_s)
        if oversample > 1.0:  # HydraServe samples the generated requests down to the target rate
            t = t[rng.uniform(size=len(t)) < 1.0 / oversample]
        parts_t.append(t)
        parts_f.append(np.full(len(t), fn, dtype=np.int64))
    times = concat(parts_t, float)
    funcs = concat(parts_f, np.int64)
    order = np.argsort(times, kind="stable")
    return Arrivals(times=times[order], functions=funcs[order])


@dataclass(frozen=True)
class GammaWorkload:
    """Per-function (or aggregate) Gamma arrivals over a popularity vector; see ``gamma_arrivals``."""

    popularity: np.ndarray
    per_function: bool = True
    oversample: float = 1.0

    def __call__(self, rate: float, cv: float, duration_s: float, seed: int) -> Arrivals:
        return gamma_arrivals(self.popularity, rate, cv, duration_s, seed, self.per_function, self.oversample)


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
