"""Leader election over a coordination.k8s.io/v1 Lease: of the control plane's replicas, one
runs the interceptor (two schedulers binding the same pods would fight over every binding).

The rules are client-go's leaderelection: a candidate takes the Lease when nobody holds it or its
holder has not renewed it within ``leaseDurationSeconds``; the holder renews it every
``renew_s``; every write carries the Lease's resourceVersion, so of two candidates racing for
an expired Lease exactly one wins (the other gets 409 and keeps waiting). A holder that cannot
renew within the lease duration stops leading before anyone else may start; one that stops
gracefully gives the Lease up (holder cleared) so a successor need not wait it out.
"""

from __future__ import annotations

import datetime
import logging
import threading
from collections.abc import Callable
from typing import Any

from kubernetes.client import ApiException, CoordinationV1Api

log = logging.getLogger(__name__)

CALL_TIMEOUT_S = 5.0  # a hung call must not outlast the renew deadline unseen


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _stamp(at: datetime.datetime) -> str:
    return at.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _parse(stamp: Any) -> datetime.datetime | None:
    if stamp is None:
        return None
    if isinstance(stamp, datetime.datetime):
        return stamp if stamp.tzinfo else stamp.replace(tzinfo=datetime.UTC)
    return datetime.datetime.fromisoformat(str(stamp).replace("Z", "+00:00"))


class LeaderElection:
    """Campaign for one Lease; ``lead`` runs while we hold it."""

    def __init__(self, coordination: CoordinationV1Api, namespace: str, name: str, identity: str, *,
                 lease_s: float = 15.0, renew_s: float = 5.0, retry_s: float = 2.0) -> None:
        self._api, self.namespace, self.name, self.identity = coordination, namespace, name, identity
        self.lease_s, self.renew_s, self.retry_s = lease_s, renew_s, retry_s
        self.leading = threading.Event()

    def try_acquire(self) -> bool:
        """One attempt to take or renew the Lease; True if we hold it now."""
        now = _now()
        spec = {"holderIdentity": self.identity, "leaseDurationSeconds": round(self.lease_s),
                "renewTime": _stamp(now)}
        try:
            lease = self._api.read_namespaced_lease(self.name, self.namespace, _request_timeout=CALL_TIMEOUT_S)
        except ApiException as exc:
            if exc.status != 404:
                log.warning("reading lease %s: %s %s", self.name, exc.status, exc.reason)
                return False
            body = {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                    "metadata": {"name": self.name, "namespace": self.namespace},
                    "spec": {**spec, "acquireTime": _stamp(now), "leaseTransitions": 0}}
            return self._write(lambda: self._api.create_namespaced_lease(self.namespace, body,
                                                                         _request_timeout=CALL_TIMEOUT_S))
        except Exception as exc:  # a timeout, a broken connection: not acquired this time
            log.warning("reading lease %s: %s", self.name, exc)
            return False
        held = lease.spec.holder_identity if lease.spec else None
        renewed = _parse(lease.spec.renew_time if lease.spec else None)
        duration = (lease.spec.lease_duration_seconds if lease.spec else None) or self.lease_s
        expired = renewed is None or (now - renewed).total_seconds() > duration
        if held and held != self.identity and not expired:
            return False
        transitions = (lease.spec.lease_transitions or 0) if lease.spec else 0
        if held != self.identity:
            spec |= {"acquireTime": _stamp(now), "leaseTransitions": transitions + 1}
        body = {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                "metadata": {"name": self.name, "namespace": self.namespace,
                             "resourceVersion": lease.metadata.resource_version},
                "spec": {**self._api.api_client.sanitize_for_serialization(lease.spec), **spec}}
        return self._write(lambda: self._api.replace_namespaced_lease(self.name, self.namespace, body,
                                                                      _request_timeout=CALL_TIMEOUT_S))

    def _write(self, call: Callable[[], object]) -> bool:
        try:
            call()
            return True
        except ApiException as exc:
            if exc.status != 409:  # 409: another candidate wrote first
                log.warning("writing lease %s: %s %s", self.name, exc.status, exc.reason)
            return False
        except Exception as exc:  # a timeout, a broken connection: not renewed
            log.warning("writing lease %s: %s", self.name, exc)
            return False

    def release(self) -> None:
        """Give the Lease up (a graceful stop), so a successor takes it at once."""
        try:
            lease = self._api.read_namespaced_lease(self.name, self.namespace, _request_timeout=CALL_TIMEOUT_S)
            if lease.spec and lease.spec.holder_identity == self.identity:
                spec = self._api.api_client.sanitize_for_serialization(lease.spec)
                spec.pop("holderIdentity", None)
                body = {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                        "metadata": {"name": self.name, "namespace": self.namespace,
                                     "resourceVersion": lease.metadata.resource_version}, "spec": spec}
                self._api.replace_namespaced_lease(self.name, self.namespace, body, _request_timeout=CALL_TIMEOUT_S)
        except Exception as exc:  # the successor waits the lease out instead
            log.warning("releasing lease %s: %s", self.name, exc)

    def run(self, lead: Callable[[threading.Event], None], stop: threading.Event) -> None:
        """Campaign until ``stop``: while we hold the Lease, ``lead(lost)`` runs in a thread and
        must return soon after ``lost`` is set (we could not renew in time, or ``stop``)."""
        while not stop.is_set():
            if not self.try_acquire():
                stop.wait(self.retry_s)
                continue
            log.info("leading (lease %s/%s)", self.namespace, self.name)
            self.leading.set()
            lost = threading.Event()
            leader = threading.Thread(target=lead, args=(lost,), name="leader", daemon=True)
            leader.start()
            last = _now()
            while not stop.wait(self.renew_s):
                if self.try_acquire():
                    last = _now()
                elif (_now() - last).total_seconds() > self.lease_s - self.renew_s:
                    log.warning("could not renew lease %s in time: no longer leading", self.name)
                    break
            lost.set()
            leader.join(self.lease_s)
            self.leading.clear()
            if stop.is_set():
                self.release()
