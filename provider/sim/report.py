"""Run simulations over policies x rates x CVs and format the summary table.

Called by `hydraserve simulate` and benchmarks/placement_attainment.py.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from hydraserve.provider.sim.engine import Simulator, summarize
from hydraserve.provider.sim.replay import ReplayWorkload, read_azure_trace, synthetic_trace
from hydraserve.provider.sim.spec import SimSpec
from hydraserve.provider.sim.workload import Arrivals, GammaWorkload, zipf_popularity

# (rate req/s, cv, duration s, seed) -> arrivals: GammaWorkload or replay.ReplayWorkload
Workload = Callable[[float, float, float, int], Arrivals]

COLUMNS = ("policy", "rate", "cv", "slo_attainment", "cold_attainment", "ttft_p50_s", "ttft_p99_s",
           "tpot_mean_s", "tpot_attainment", "cost_gb_s", "cold_starts", "warm_fraction")


def build_workload(kind: str, spec: SimSpec, trace_path: str | None = None, zipf: float = 1.0,
                   per_function: bool = True, oversample: float = 1.0) -> Workload:
    """``replay``: HydraServe's generator over the trace at ``trace_path`` or, without one, over a
    synthetic trace of the real one's size with Zipf(``zipf``) totals, mapped onto the functions
    in ``spec.trace_order``; ``gamma``: stationary Gamma processes over Zipf(``zipf``) shares in
    function order (per function, or one aggregate stream)."""
    n_functions = len(spec.functions)
    if kind == "replay":
        trace = read_azure_trace(trace_path) if trace_path else synthetic_trace(zipf=zipf)
        return ReplayWorkload.from_trace(trace, n_functions, spec.trace_order)
    if kind == "gamma":
        if trace_path:
            raise ValueError("--trace goes with the replay workload (the gamma workload is synthetic)")
        return GammaWorkload(zipf_popularity(n_functions, zipf), per_function, oversample)
    raise ValueError(f"unknown workload {kind!r}: replay or gamma")


def sweep(spec: SimSpec, workload: Workload, policies: Iterable[str], rates: Iterable[float],
          cvs: Iterable[float], duration_s: float, seed: int) -> list[dict[str, float | str]]:
    """Same arrivals for every policy at a given (rate, cv): the comparison is paired."""
    rows: list[dict[str, float | str]] = []
    for rate in rates:
        for cv in cvs:
            arrivals = workload(rate, cv, duration_s, seed)
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
