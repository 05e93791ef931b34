"""The cold start's ports: what it asks of the placement service, of a node, of a launcher (how
a worker comes to exist: a child process, a pod) and of a launched worker, and the worker's own
HTTP client (``/readyz`` as its WorkerStatus, its timeline) that every launcher answers with.

Implemented by hydraserve.provider.embedded.process (local processes, warm pools) and
hydraserve.activator.knative.pods (pods); used by hydraserve.provider.coldstart.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import requests

from hydraserve.contracts.plan import Plan, PlanRequest, WorkerReport
from hydraserve.contracts.timeline import Timeline
from hydraserve.contracts.worker import WorkerEnvironment, WorkerStatus
from hydraserve.errors import TemporaryError


class PlacementPort(Protocol):
    """What the cold start needs from the placement service (its HTTP client fits)."""

    def plan(self, request: PlanRequest) -> Plan: ...

    def report(self, report: WorkerReport) -> object: ...


class NodeAccess(Protocol):
    """How to reach one node's loaderd."""

    @property
    def name(self) -> str: ...

    @property
    def loaderd_url(self) -> str: ...

    @property
    def loaderd_token(self) -> str: ...


class LaunchedWorker(Protocol):
    """One worker a launcher started."""

    url: str
    spawned_at: float
    adopted: bool  # a pooled process of the node's warm pool took the work (no process start)

    def wait_ready(self, timeout_s: float) -> None:
        """Return once it serves; raise a HydraError with its reason if it cannot."""
        ...

    def stop(self, grace_s: float = 10.0) -> object:
        """Drain and stop it; must not raise for a worker that is already gone."""
        ...

    def status(self) -> WorkerStatus:
        """What it says of itself (its /readyz: status, reason, consolidated); raises HydraError
        when it does not answer."""
        ...

    def timeline(self) -> Timeline:
        """Its own start-up timeline; raises HydraError when it does not answer."""
        ...

    def lost(self) -> bool:
        """Whether it is gone without having been stopped (killed, its node down); cheap, no
        network call. A worker that failed with a reason is not lost: it says why."""
        ...


def worker_status(url: str) -> WorkerStatus:
    """A worker's /readyz (status, reason, consolidated), for launchers' ``status``;
    TemporaryError when it does not answer, or not with a worker's status."""
    try:
        return WorkerStatus.model_validate(requests.get(url + "/readyz", timeout=2).json())
    except (requests.RequestException, ValueError) as exc:  # pydantic's ValidationError is a ValueError
        raise TemporaryError(f"worker at {url} did not answer with its status: {exc}") from exc


def worker_timeline(url: str) -> Timeline:
    """A worker's own start-up timeline, for launchers' ``timeline``; TemporaryError when it
    does not answer."""
    try:
        response = requests.get(url + "/v1/hydraserve/timeline", timeout=5)
        response.raise_for_status()
    except requests.RequestException as exc:
        raise TemporaryError(f"worker at {url} did not answer: {exc}") from exc
    return Timeline.model_validate(response.json())


@dataclass(frozen=True)
class WorkerSlot:
    """Where a worker about to be launched will answer: its HTTP port and its stage link's."""

    host: str
    port: int
    transport_port: int

    @property
    def transport_address(self) -> str:
        return f"{self.host}:{self.transport_port}"


class WorkerLauncher(Protocol):
    """The port: makes workers exist on nodes (child processes, pods)."""

    def reserve(self, node: str) -> WorkerSlot:
        """Where a worker about to be launched on ``node`` will answer."""
        ...

    def launch(self, node: str, env: WorkerEnvironment) -> LaunchedWorker:
        """Start a worker with this environment (host and ports from ``reserve``)."""
        ...
