"""Learn the cold-start model from observed cold starts instead of HydraServe's fixed numbers.

HydraServe predicts a cold start as fetch + 2 s with a static bandwidth table (its artifact's algs.py; docs/PLACEMENT.md).
We keep two estimates, fed by worker reports (service) or simulated completions (simulator):

* per-node NIC bandwidth: each report gives bits / fetch seconds; the fetch shared the NIC with
  m fetches on average (the cluster model integrates that), so the NIC's rate is about
  m x bits / seconds. An EWMA (alpha 0.3) starting from the configured value.
* the start-up model T = max(F, W) + C + K x G: F the slowest stage's fetch, G its size in GB,
  W the work that overlaps the fetch (process start, imports, device init, KV allocation), C
  what follows the last byte, K the per-GB part of it (host-to-device copy of what is left).
  Fit on the last 64 (F, G, T) triples over a grid of W (every observed F, and 0): for each W,
  C and K by least squares on T - max(F, W) (K clamped at 0), and the W with the least sum of
  absolute residuals wins. With fewer than ``min_samples`` the prior (W = 0, C = 2 s, K = 0:
  HydraServe's model) is used.
* the same model per node, from the reports of the workers that ran there (each worker's own
  fetch, stage GB and plan-to-ready time): start-up differs between nodes (Figure 7: a V100
  node's overlapped start-up is ~6.3 s, an A10 node's ~4.6 s), and one cluster-wide model
  would hide that the faster nodes meet an SLO the slower ones cannot. A node without
  ``min_samples`` of its own uses the cluster-wide model.
* all of the above twice: for workers started as a process, and for workers adopted from a
  node's warm pool (runtime/embedded/forkserver.py: no interpreter start, no imports). The adoption's
  prior is W = 0, C = 0.5 s (a guess until adopted starts are observed: measured on this
  machine, 0.1-0.4 s from adoption to ready with the weights resident).

Owners: the service calls ``observe_*`` under its lock; the planner reads ``predict_startup``.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import numpy as np

PRIOR_OVERLAP_S = 0.0
PRIOR_TAIL_S = 2.0  # HydraServe's unmeasured post-fetch constant
PRIOR_ADOPT_TAIL_S = 0.5


@dataclass
class StartupModel:
    """T = max(F, overlap_s) + tail_s + per_gb_s x G."""

    overlap_s: float = PRIOR_OVERLAP_S
    tail_s: float = PRIOR_TAIL_S
    per_gb_s: float = 0.0

    def predict(self, fetch_s: float, stage_gb: float = 0.0) -> float:
        return max(fetch_s, self.overlap_s) + self.tail_s + self.per_gb_s * stage_gb

    def after_fetch_s(self, stage_gb: float) -> float:
        """What follows the last byte (the fetch deadline leaves room for it)."""
        return self.tail_s + self.per_gb_s * stage_gb


@dataclass
class Calibration:
    """Running estimates; ``enabled=False`` keeps the static model (the `hydraserve` policy)."""

    enabled: bool = True
    alpha: float = 0.3
    window: int = 64
    min_samples: int = 4
    refit_every: int = 4
    model: StartupModel = field(default_factory=StartupModel)
    adopt_model: StartupModel = field(default_factory=lambda: StartupModel(tail_s=PRIOR_ADOPT_TAIL_S))
    adopt_samples: deque[tuple[float, float, float]] = field(default_factory=deque)
    node_bps: dict[str, float] = field(default_factory=dict)
    node_samples: dict[str, int] = field(default_factory=dict)
    samples: deque[tuple[float, float, float]] = field(default_factory=deque)
    node_models: dict[str, StartupModel] = field(default_factory=dict)
    node_startups: dict[str, deque[tuple[float, float, float]]] = field(default_factory=dict)
    _since_fit: int = 0
    _adopt_since_fit: int = 0
    _node_since_fit: dict[str, int] = field(default_factory=dict)

    def bandwidth_bps(self, node: str, configured_bps: float) -> float:
        if not self.enabled:
            return configured_bps
        return self.node_bps.get(node, configured_bps)

    def observe_fetch(self, node: str, bits: float, seconds: float, sharing: float,
                      configured_bps: float) -> bool:
        """One finished fetch on ``node``; returns whether the estimate moved."""
        if not self.enabled or bits <= 0 or seconds <= 1e-3:
            return False
        sample = bits / seconds * max(1.0, sharing)
        old = self.node_bps.get(node, configured_bps)
        self.node_bps[node] = (1 - self.alpha) * old + self.alpha * sample
        self.node_samples[node] = self.node_samples.get(node, 0) + 1
        return True

    def observe_cold_start(self, fetch_s: float, cold_start_s: float, stage_gb: float = 0.0,
                           node: str | None = None, *, adopted: bool = False) -> bool:
        """One cold start: fetch seconds, stage GB, plan-to-ready seconds. ``node``: one worker's
        own figures on that node (also fits the node's model); None: a whole group's.
        ``adopted``: its worker came from the node's warm pool (the adoption's models learn)."""
        if not self.enabled or cold_start_s <= 0:
            return False
        sample = (max(0.0, fetch_s), max(0.0, stage_gb), cold_start_s)
        if adopted:
            self._adopt_since_fit = self._add(self.adopt_samples, sample, self._adopt_since_fit)
            if self._adopt_since_fit == 0:
                self.adopt_model = fit_startup(list(self.adopt_samples))
        else:
            self._since_fit = self._add(self.samples, sample, self._since_fit)
            if self._since_fit == 0:
                self.model = fit_startup(list(self.samples))
        if node is not None:
            key = _node_key(node, adopted)
            window = self.node_startups.setdefault(key, deque())
            since = self._add(window, sample, self._node_since_fit.get(key, 0))
            self._node_since_fit[key] = since
            if since == 0:
                self.node_models[key] = fit_startup(list(window))
        return True

    def _add(self, window: deque[tuple[float, float, float]], sample: tuple[float, float, float],
             since_fit: int) -> int:
        """Append to a bounded window; returns the new count since the last fit (0: refit now)."""
        window.append(sample)
        while len(window) > self.window:
            window.popleft()
        since_fit += 1
        if len(window) >= self.min_samples and (since_fit >= self.refit_every or len(window) == self.min_samples):
            return 0
        return since_fit

    def startup_for(self, node: str, *, adopted: bool = False) -> StartupModel:
        """The node's own start-up model once it has enough samples, else the cluster-wide one
        (``adopted``: of a worker adopted from its warm pool)."""
        return self.node_models.get(_node_key(node, adopted), self.adopt_model if adopted else self.model)

    def predict_startup(self, fetch_s: float, stage_gb: float = 0.0) -> float:
        return self.model.predict(fetch_s, stage_gb)


def _node_key(node: str, adopted: bool) -> str:
    return f"{node}#pool" if adopted else node  # '#' is in no node name (DNS names)


def fit_startup(samples: list[tuple[float, float, float]]) -> StartupModel:
    """Fit T = max(F, W) + C + K x G over a grid of W (see module docstring); samples are (F, G, T)."""
    arr = np.asarray(samples, dtype=float)
    f, g, t = arr[:, 0], arr[:, 1], arr[:, 2]
    grid = np.unique(np.concatenate([[0.0], f]))
    y = t[None, :] - np.maximum(f[None, :], grid[:, None])  # (grid, samples)
    gm = g.mean()
    var = float(((g - gm) ** 2).sum())
    ym = y.mean(axis=1)
    k = ((y - ym[:, None]) * (g - gm)[None, :]).sum(axis=1) / var if var > 1e-12 else np.zeros(len(grid))
    k = np.maximum(k, 0.0)
    c = ym - k * gm
    err = np.abs(y - c[:, None] - k[:, None] * g[None, :]).sum(axis=1)
    best = int(np.argmin(err))
    return StartupModel(overlap_s=float(grid[best]), tail_s=max(0.0, float(c[best])), per_gb_s=float(k[best]))
