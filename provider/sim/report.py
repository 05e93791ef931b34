"""Run simulations over policies x rates x CVs and format the summary table.

Called by `hydraserve simulate` and benchmarks/placement_attainment.py.
"""

from __future__ import annotations

from collections.abc import Iterable

from hydraserve.provider.sim.engine import Simulator, summarize
from hydraserve.provider.sim.spec import SimSpec
from hydraserve.provider.sim.workload import gamma_arrivals

COLUMNS = ("policy", "rate", "cv", "slo_attainment", "cold_attainment", "ttft_p50_s", "ttft_p99_s",
           "tpot_mean_s", "cost_gb_s", "cold_starts")


def sweep(spec: SimSpec, popularity, policies: Iterable[str], rates: Iterable[float], cvs: Iterable[float],
          duration_s: float, seed: int, per_function: bool = True,
          oversample: float = 1.0) -> list[dict[str, float | str]]:
    """Same arrivals for every policy at a given (rate, cv): the comparison is paired.

    ``per_function``: Gamma bursts per function (HydraServe's generator) or in aggregate."""
    rows: list[dict[str, float | str]] = []
    for rate in rates:
        for cv in cvs:
            arrivals = gamma_arrivals(popularity, rate, cv, duration_s, seed, per_function, oversample)
            for policy in policies:
                summary = summarize(Simulator(spec, policy, arrivals).run(), spec.functions)
                rows.append({"policy": policy, "rate": rate, "cv": cv, **summary})
    return rows


def table(rows: list[dict[str, float | str]]) -> str:
    def fmt(v: float | str) -> str:
        if isinstance(v, str):
            return v
        if isinstance(v, int):
            return str(v)
        return f"{v:.3f}" if abs(v) < 1000 else f"{v:.3g}"
    lines = ["  ".join(f"{c:>16}" for c in COLUMNS)]
    for r in rows:
        lines.append("  ".join(f"{fmt(r.get(c, '')):>16}" for c in COLUMNS))
    return "\n".join(lines)
