"""What each node's loaderd really holds, told to the placement service (reconciliation).

The placement's own bookkeeping says what cold starts fetched; the daemon knows what it still
holds (it evicts under its budget, and a restarted or dead daemon holds nothing). The node's
record is re-registered with the daemon's residency; a daemon that does not answer holds nothing
the planner may count on.
"""

from __future__ import annotations

import logging
from typing import Protocol

from hydraserve.contracts.loader import LoaderStatus
from hydraserve.contracts.plan import NodeInfo, Residency
from hydraserve.errors import HydraError

log = logging.getLogger(__name__)


class Registrar(Protocol):
    def register_node(self, node: NodeInfo) -> object: ...


class StatusSource(Protocol):
    def status(self) -> LoaderStatus: ...


def residency_of(status: LoaderStatus) -> list[Residency]:
    """The models a daemon holds, as complete segment groups ("embed", "layer.<i>", "head")."""
    held = []
    for model in status.models:
        groups = set(model.groups_complete)
        layers = sorted(int(g.split(".", 1)[1]) for g in groups if g.startswith("layer."))
        if groups:
            held.append(Residency(model_uri=model.model_uri, layers=layers, embeddings="embed" in groups,
                                  head="head" in groups))
    return held


def reconcile_node(placement: Registrar, node: NodeInfo, loaderd: StatusSource) -> list[Residency]:
    """Re-register ``node`` with what its daemon holds now (nothing if it does not answer)."""
    try:
        residency = residency_of(loaderd.status())
    except HydraError as exc:
        log.warning("loaderd of %s did not answer (%s): its models are no longer counted as cached",
                    node.name, exc.message)
        residency = []
    placement.register_node(node.model_copy(update={"residency": residency}))
    return residency
