"""What the gateway needs from a backend that brings functions up and down.

The seam between the local gateway (activator/embedded) and the local backends that implement
it (provider/embedded); the fake backend of the tests implements it too. On Kubernetes, pods
and Knative take this part.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from hydraserve.contracts.function import FunctionConfig
from hydraserve.contracts.timeline import Timeline


@dataclass(frozen=True)
class Endpoint:
    """Where a ready function instance answers (its stage-0 worker, or a replica)."""

    url: str
    instance_id: str


@dataclass(frozen=True)
class WorkerLog:
    """The end of one worker's log (``fn logs``): a running instance's, or one of the last failed
    cold start's (``failed_start``)."""

    instance: str
    stage: int
    node: str
    log: str  # its last lines as written (JSON lines), secrets already redacted where written
    failed_start: bool = False


class FunctionBackend(Protocol):
    can_prewarm: bool  # prewarm() can put a function's bytes where its next cold start reads them
    def prepare(self, function: FunctionConfig) -> object:
        """Read what a cold start needs to know of the function's model, at deploy time; raises
        HydraError when the model cannot be read or run (nothing has started then)."""
        ...

    def model_fingerprint(self, function: FunctionConfig) -> str:
        """A digest that changes whenever the function's model does (a new push), asked of its
        store now; a failed function starts again when it changes."""
        ...

    def start(self, function: FunctionConfig, timeline: Timeline,
              exclude_nodes: Sequence[str] = ()) -> Endpoint:
        """Bring one instance up, avoiding ``exclude_nodes``, and return once it is ready.

        Raises HydraError on failure: InstanceFailedError (with ``nodes``) when workers were
        lost, so a retry can avoid their nodes. Implementations mark their steps on
        ``timeline`` (plan, prefetch, worker spawn, ...).
        """
        ...

    def stop(self, function_name: str, instance_id: str) -> None:
        """Scale the instance down (drain, then stop); must not raise for a dead instance."""
        ...

    def fail(self, function_name: str, instance_id: str, reason: str) -> tuple[str, ...]:
        """The instance cannot serve: stop what is left of it, free its placement, and return
        the nodes where its workers were lost; must not raise for an unknown instance."""
        ...

    def take_replicas(self, instance_id: str) -> list[Endpoint]:
        """Standalone replicas the instance became since last asked (a consolidated pipeline
        group's other full workers; asked every reaper tick). Each is an instance of its own
        from then on (stop, fail, lost_nodes by its id); nothing is returned twice."""
        ...

    def prewarm(self, function: FunctionConfig, hold_s: float) -> int:
        """Fetch the function's weights into the loaderd of the node(s) its next cold start
        would use and hold them there ``hold_s`` seconds; the bytes fetched (0: already there).
        Best effort: a node that cannot take them is skipped."""
        ...

    def instance_memory_gb(self, instance_id: str) -> float:
        """Device memory the instance's workers hold now (GB; 0 for an unknown instance): what its
        usage is billed by (cheap; asked every reaper tick)."""
        ...

    def lost_nodes(self, instance_id: str) -> tuple[str, ...]:
        """Nodes where the instance lost a worker (cheap; asked every reaper tick)."""
        ...

    def worker_timeline(self, endpoint: Endpoint) -> Timeline:
        """The instance's own start-up timeline (worker and loaderd events)."""
        ...

    def worker_logs(self, function_name: str, tail: int) -> list[WorkerLog]:
        """The last ``tail`` lines of each worker of the function's running instances, and of the
        workers of its last failed cold start whose logs exist (they are gone: their log is what
        says why); never a secret (a worker's env is not logged)."""
        ...
