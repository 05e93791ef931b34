"""What the gateway needs from a backend that brings functions up and down.

Declared here by its user (the gateway); provider/backends implement it for local processes
and for Kubernetes pods.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from hydraserve.activator.functions import FunctionConfig
from hydraserve.contracts.timeline import Timeline


@dataclass(frozen=True)
class Endpoint:
    """Where a ready function instance answers (its stage-0 worker)."""

    url: str
    instance_id: str


class FunctionBackend(Protocol):
    def start(self, function: FunctionConfig, timeline: Timeline) -> Endpoint:
        """Bring one instance up and return once it is ready; raise HydraError on failure.

        Implementations mark their steps on ``timeline`` (plan, prefetch, worker spawn, ...).
        """
        ...

    def stop(self, function_name: str, instance_id: str) -> None:
        """Scale the instance down (drain, then stop); must not raise for a dead instance."""
        ...

    def worker_timeline(self, endpoint: Endpoint) -> Timeline:
        """The instance's own start-up timeline (worker and loaderd events)."""
        ...
