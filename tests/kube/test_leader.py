"""Leader election over a Lease, against the Kubernetes API (the fake over real HTTP, or a real
cluster with KUBECONFIG): one leader at a time, a graceful stop hands over at once, a holder
that stopped renewing is replaced after its lease duration, racing candidates get 409."""

from __future__ import annotations

import threading
import time

from kubernetes.client import CoordinationV1Api

from hydraserve.activator.knative.leader import LeaderElection
from tests.kube.conftest import Cluster


def elector(cluster: Cluster, identity: str, **timing: float) -> LeaderElection:
    api = CoordinationV1Api(cluster.core.api_client)
    return LeaderElection(api, cluster.namespace, "hydraserve-interceptor", identity,
                          **({"lease_s": 2.0, "renew_s": 0.3, "retry_s": 0.1} | timing))


class Candidate:
    def __init__(self, election: LeaderElection) -> None:
        self.election = election
        self.stop = threading.Event()
        self.terms = 0
        self.thread = threading.Thread(target=election.run, args=(self.lead, self.stop), daemon=True)

    def lead(self, lost: threading.Event) -> None:
        self.terms += 1
        lost.wait()

    def __enter__(self) -> Candidate:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(10)


def wait(check: object, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():  # type: ignore[operator]
            return
        time.sleep(0.02)
    raise AssertionError("timed out")


def test_one_leader_at_a_time_and_a_graceful_stop_hands_over_at_once(cluster: Cluster) -> None:
    with Candidate(elector(cluster, "a")) as a:
        wait(a.election.leading.is_set)
        with Candidate(elector(cluster, "b")) as b:
            time.sleep(1.0)  # b campaigns all along
            assert a.election.leading.is_set() and not b.election.leading.is_set()
            a.__exit__()
            started = time.monotonic()
            wait(b.election.leading.is_set)
            assert time.monotonic() - started < 1.5  # no lease duration waited out
            lease = CoordinationV1Api(cluster.core.api_client).read_namespaced_lease(
                "hydraserve-interceptor", cluster.namespace)
            assert lease.spec.holder_identity == "b" and lease.spec.lease_transitions == 1


def test_a_holder_that_stopped_renewing_is_replaced_after_its_lease_duration(cluster: Cluster) -> None:
    dead = elector(cluster, "dead")
    assert dead.try_acquire()  # then it dies without a word
    with Candidate(elector(cluster, "b")) as b:
        time.sleep(1.0)
        assert not b.election.leading.is_set()  # its lease (2 s) still runs
        wait(lambda: b.terms == 1, 5)  # leading is set just before its callback runs: wait for the term
        assert b.election.leading.is_set()


def test_of_two_candidates_racing_for_one_lease_exactly_one_wins(cluster: Cluster) -> None:
    first, second = elector(cluster, "x"), elector(cluster, "y")
    stale = CoordinationV1Api(cluster.core.api_client)
    assert first.try_acquire()
    lease = stale.read_namespaced_lease("hydraserve-interceptor", cluster.namespace)
    assert first.try_acquire()  # renewed: the lease's resourceVersion moved on
    body = stale.api_client.sanitize_for_serialization(lease)
    body["spec"]["holderIdentity"] = "y"
    from kubernetes.client import ApiException

    try:
        stale.replace_namespaced_lease("hydraserve-interceptor", cluster.namespace, body)
        raise AssertionError("a write with a stale resourceVersion was accepted")
    except ApiException as exc:
        assert exc.status == 409
    assert not second.try_acquire()  # x holds it and renews
