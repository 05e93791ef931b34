"""loaderd's Prometheus metrics, on a registry of their own (several daemons may share a process
in tests). Updated by the fetch engine (as its FetchObserver) and by the service; served at
GET /metrics by hydraserve.loaderd.api."""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class LoaderMetrics:
    """Counters and gauges of one daemon."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.bytes_fetched = Counter("loaderd_fetched_bytes_total", "Bytes fetched, by source",
                                     ["source"], registry=r)
        self.errors = Counter("loaderd_fetch_errors_total", "Failed range reads (before retry)",
                              ["source", "kind"], registry=r)
        self.inflight = Gauge("loaderd_inflight_chunks", "Range reads in flight", registry=r)
        self.resident_bytes = Gauge("loaderd_resident_bytes", "Bytes of shared memory held",
                                    registry=r)
        self.segments = Gauge("loaderd_segments", "Segments by state", ["state"], registry=r)
        self.leases = Gauge("loaderd_leases", "Live leases (prefetch pins and attaches)", registry=r)
        self.abandoned = Counter("loaderd_abandoned_segments_total",
                                 "Segments whose fill stopped because no lease held them any more", registry=r)
        self.evictions = Counter("loaderd_evictions_total", "Segments evicted (LRU)", registry=r)
        self.failures = Counter("loaderd_segment_failures_total", "Segments that failed to fill",
                                registry=r)
        self.integrity_failures = Counter("loaderd_integrity_failures_total",
                                          "Files whose bytes did not match the manifest", registry=r)
        self.segments_completed = Counter("loaderd_segments_completed_total", "Segments filled",
                                          registry=r)
        self.fill_seconds = Histogram("loaderd_segment_fill_seconds", "Time to fill one segment",
                                      buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
                                      registry=r)
        self.peer_served = Counter("loaderd_peer_served_bytes_total", "Bytes served to other nodes",
                                   registry=r)
        self.throughput = Gauge("loaderd_fetch_throughput_bytes_per_second",
                                "Fetch throughput over the last few seconds", registry=r)
        self.hedges = Counter("loaderd_hedged_reads_total",
                              "Duplicate reads of straggling chunks (started, won, failed)", ["outcome"],
                              registry=r)
        self._window: list[tuple[float, int]] = []

    # FetchObserver
    def on_bytes(self, kind: str, n: int) -> None:
        self.bytes_fetched.labels(source=kind).inc(n)
        now = time.monotonic()
        self._window.append((now, n))
        while self._window and self._window[0][0] < now - 5.0:
            self._window.pop(0)
        span = max(now - self._window[0][0], 0.5)
        self.throughput.set(sum(b for _, b in self._window) / span)

    def on_error(self, kind: str, error: str) -> None:
        self.errors.labels(source=kind, kind=error).inc()

    def on_inflight(self, delta: int) -> None:
        self.inflight.inc(delta)

    def on_hedge(self, outcome: str) -> None:
        self.hedges.labels(outcome=outcome).inc()
