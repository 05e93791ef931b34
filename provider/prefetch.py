"""loaderd's part of a cold start: every chosen node's daemon told to fetch its stage before any
worker exists, and each stage's fetch watched until the daemon holds every byte.

Used by hydraserve.provider.coldstart (its prefetch step, and pre-warming from a function's
history: ``prefetch_pinned``). A node whose loaderd does not
answer is skipped (its worker fetches from S3 itself); the lease each prefetch holds pins the
bytes until the worker holds its own, then ``finish`` drops it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping

from hydraserve.contracts.loader import LeaseResponse
from hydraserve.contracts.plan import Plan
from hydraserve.contracts.timeline import Moment, Timeline
from hydraserve.errors import HydraError, UnreachableError
from hydraserve.loaderd.client import LoaderClient
from hydraserve.provider.worker_port import NodeAccess

log = logging.getLogger(__name__)


def start_prefetches(plan: Plan, nodes: Mapping[str, NodeAccess], timeline: Timeline, s3_endpoint_url: str | None,
                     pin_s: float) -> list[Prefetch]:
    """Tell every chosen node's loaderd to fetch its stage now, before any worker exists.
    A node whose loaderd does not answer is skipped: its worker fetches from S3 itself."""
    started: list[Prefetch] = []
    for st, request in plan.prefetch_orders(s3_endpoint_url, pin_s):
        node = nodes[st.node]
        if not node.loaderd_url:
            timeline.mark(Moment.PREFETCH_SKIPPED, component="backend", node=node.name, reason="no loaderd on the node")
            continue
        loader = LoaderClient(node.loaderd_url, node.loaderd_token)
        try:
            lease = loader.prefetch(request)
        except UnreachableError as exc:
            log.warning("no prefetch on %s, its worker will fetch from S3: %s", node.name, exc.message)
            timeline.mark(Moment.PREFETCH_SKIPPED, component="backend", node=node.name, reason=exc.message)
            loader.close()
            continue
        except BaseException:
            loader.close()
            for prefetch in started:
                prefetch.finish()
            raise
        timeline.mark(Moment.PREFETCH_STARTED, component="loaderd", node=node.name, stage=st.stage.index,
                      bytes=lease.bytes_total, bytes_new=lease.bytes_new)
        started.append(Prefetch(loader, lease, timeline, node.name, st.stage.index))
    return started


def prefetch_pinned(plan: Plan, nodes: Mapping[str, NodeAccess], s3_endpoint_url: str | None, pin_s: float) -> int:
    """Have ``plan``'s nodes fetch their stages into loaderd, pinned for ``pin_s``, with no worker
    to follow (a pre-warm); the bytes fetched. A node whose loaderd does not answer or has no room
    is skipped."""
    fetched = 0
    for st, request in plan.prefetch_orders(s3_endpoint_url, pin_s):
        node = nodes.get(st.node)
        if node is None or not node.loaderd_url:
            continue
        loader = LoaderClient(node.loaderd_url, node.loaderd_token)
        try:
            fetched += loader.prefetch(request).bytes_new
        except HydraError as exc:
            log.warning("no pre-warm of %s on %s: %s", plan.function, st.node, exc.message)
        finally:
            loader.close()
    return fetched


class Prefetch:
    """One stage's prefetch lease, and when loaderd held every byte of it: marks
    'weights_fetched' (polls the daemon's status with its own client, ~20 ms resolution)."""

    def __init__(self, loader: LoaderClient, lease: LeaseResponse, timeline: Timeline, node: str, stage: int,
                 poll_s: float = 0.02) -> None:
        self.loader, self.lease, self.stage = loader, lease, stage
        self._timeline, self._node, self._poll_s = timeline, node, poll_s
        self._segments = {s.segment_id for s in lease.segments}
        self._stop = threading.Event()
        self._started = time.time()
        self.fetch_s: float | None = None
        self._thread = threading.Thread(target=self._watch, name="fetch-watch", daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        while not self._stop.is_set():
            try:
                segments = [s for s in self.loader.status().segments if s.segment_id in self._segments]
            except HydraError as exc:  # a slow or busy daemon: keep watching
                log.debug("loaderd status failed: %s", exc.message)
                self._stop.wait(self._poll_s)
                continue
            self._timeline.progress(**{f"fetched_bytes.{self.stage}": sum(s.bytes_ready for s in segments),
                                       f"fetch_bytes.{self.stage}": sum(s.tensor_bytes for s in segments)})
            if segments and all(s.state == "complete" for s in segments):
                now = time.time()
                self.fetch_s = now - self._started
                self._timeline.mark(Moment.WEIGHTS_FETCHED, component="loaderd", at=now, node=self._node,
                                    bytes=sum(s.tensor_bytes for s in segments))
                return
            if any(s.state == "failed" for s in segments):
                return
            self._stop.wait(self._poll_s)

    def finish(self) -> None:
        """Stop watching and drop the prefetch's pin (the worker holds its own lease by now)."""
        self._stop.set()
        self._thread.join(timeout=2)
        try:
            self.loader.release(self.lease.lease_id)
        except Exception as exc:  # the daemon may be gone: its lease goes with it
            log.warning("could not release prefetch lease %s: %s", self.lease.lease_id, exc)
        self.loader.close()
