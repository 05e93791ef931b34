"""The Grafana dashboard (manifests/grafana) asks only for what the gateway exports: every
metric a query or variable names is one GatewayMetrics registers, with the suffix its type has
(a counter's _total, a histogram's _bucket), and every panel's queries parse as PromQL-shaped
text (balanced brackets, a metric in each)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from hydraserve.activator.embedded.metrics import GatewayMetrics

DASHBOARD = Path(__file__).parents[2] / "manifests" / "grafana" / "hydraserve-functions.json"
METRIC = re.compile(r"\bhydraserve_[a-z0-9_]+")
SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}


def exported() -> set[str]:
    names = set()
    for family in GatewayMetrics().registry.collect():
        names |= {family.name + suffix for suffix in SUFFIXES[family.type]}
    return names


def queries(dashboard: dict[str, Any]) -> list[str]:
    texts = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    return texts + [v["definition"] for v in dashboard["templating"]["list"] if "definition" in v]


def test_every_query_names_a_metric_the_gateway_exports() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    texts = queries(dashboard)
    assert len(dashboard["panels"]) >= 8 and texts
    known = exported()
    for text in texts:
        named = METRIC.findall(text)
        assert named, text
        assert set(named) <= known, (set(named) - known, text)
        assert text.count("(") == text.count(")") and text.count("{") == text.count("}"), text


def test_the_usage_and_wait_metrics_are_on_the_dashboard() -> None:
    """What a serverless platform bills by and what a user waits for each have a panel."""
    named = {m for text in queries(json.loads(DASHBOARD.read_text())) for m in METRIC.findall(text)}
    assert {"hydraserve_gateway_tokens_total", "hydraserve_gateway_instance_seconds_total",
            "hydraserve_gateway_memory_gb_seconds_total", "hydraserve_gateway_cold_start_seconds_bucket",
            "hydraserve_gateway_queue_wait_seconds_bucket", "hydraserve_gateway_time_to_first_token_seconds_bucket",
            "hydraserve_gateway_cold_starts_total"} <= named
