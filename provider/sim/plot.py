"""Attainment vs rate (one panel per CV), one line per policy, like HydraServe's Figure 9.

matplotlib is optional (the `bench` extra); imported here only.
"""

from __future__ import annotations


def plot_attainment(rows: list[dict[str, float | str]], path: str) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise SystemExit("--plot needs matplotlib: pip install 'hydraserve[bench]'") from exc
    cvs = sorted({float(r["cv"]) for r in rows})
    policies = list(dict.fromkeys(str(r["policy"]) for r in rows))
    fig, axes = plt.subplots(1, len(cvs), figsize=(4.2 * len(cvs), 3.4), sharey=True, squeeze=False)
    for ax, cv in zip(axes[0], cvs, strict=True):
        for pol in policies:
            pts = sorted((float(r["rate"]), float(r["slo_attainment"])) for r in rows
                         if r["policy"] == pol and float(r["cv"]) == cv)
            ax.plot([p[0] for p in pts], [100 * p[1] for p in pts], marker="o", label=pol)
        ax.set_title(f"CV = {cv:g}")
        ax.set_xlabel("request rate (req/s)")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("TTFT SLO attainment (%)")
    axes[0][-1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
