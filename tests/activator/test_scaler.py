"""Scale-from-zero state machine with a scripted backend and an injected clock."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import pytest

from hydraserve.activator.functions import FunctionConfig
from hydraserve.activator.scaler import FunctionScaler, ScaleState
from hydraserve.errors import OverloadedError, TemporaryError
from hydraserve.testing.fake_backend import ScriptedBackend


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make(backend: ScriptedBackend, clock: Callable[[], float] | None = None, **kw: float) -> FunctionScaler:
    config = FunctionConfig(name="fn", model_uri="s3://b/m", **kw)
    return FunctionScaler(config, backend, clock or Clock())


def test_concurrent_requests_at_zero_share_one_cold_start() -> None:
    backend = ScriptedBackend(auto_release=False)
    scaler = make(backend)
    got: list[str] = []

    def worker() -> None:
        got.append(scaler.acquire().instance_id)

    threads = [threading.Thread(target=worker) for _ in range(5)]
    for t in threads:
        t.start()
    assert backend.started.wait(5)
    backend.release_start.set()
    for t in threads:
        t.join(5)
    assert got == ["fn-1"] * 5
    assert backend.starts == 1
    assert scaler.state == ScaleState.READY


def test_failed_start_wakes_waiters_and_next_request_retries() -> None:
    backend = ScriptedBackend()
    backend.fail_next = "worker exited with code 1: bad weights"
    scaler = make(backend)
    with pytest.raises(TemporaryError, match="bad weights"):
        scaler.acquire()
    assert scaler.state == ScaleState.ZERO
    assert scaler.acquire().instance_id == "fn-2"
    assert backend.starts == 2


def test_queue_bound_rejects_excess_waiters() -> None:
    backend = ScriptedBackend(auto_release=False)
    scaler = make(backend, max_queue=1)
    t = threading.Thread(target=scaler.acquire)
    t.start()
    assert backend.started.wait(5)
    with pytest.raises(OverloadedError, match="already waiting"):
        scaler.acquire()
    backend.release_start.set()
    t.join(5)


def test_request_deadline_while_starting() -> None:
    backend = ScriptedBackend(auto_release=False)
    scaler = make(backend, time.monotonic, request_timeout_s=0.2)
    with pytest.raises(OverloadedError, match="not ready within"):
        scaler.acquire()
    backend.release_start.set()


def test_idle_scale_down_uses_injected_clock() -> None:
    clock = Clock()
    backend = ScriptedBackend()
    scaler = make(backend, clock, idle_timeout_s=30)
    scaler.acquire()
    clock.now += 100
    assert not scaler.scale_down_if_idle(clock.now), "a request is still in flight"
    scaler.release()
    clock.now += 29
    assert not scaler.scale_down_if_idle(clock.now)
    clock.now += 1
    assert scaler.scale_down_if_idle(clock.now)
    assert backend.stops == ["fn-1"]
    assert scaler.state == ScaleState.ZERO
    assert scaler.acquire().instance_id == "fn-2", "a request after scale-down cold-starts again"


def test_a_start_that_loses_a_worker_is_tried_again_avoiding_its_node_while_requests_wait() -> None:
    backend = ScriptedBackend()
    backend.lose_next = ["n1", "n2"]
    scaler = make(backend)
    assert scaler.acquire().instance_id == "fn-3"  # the waiter never saw the two failures
    assert backend.excluded == [(), ("n1",), ("n1", "n2")]
    timeline = scaler.last_timeline
    assert timeline is not None and [e.name for e in timeline.events].count("cold_start_retry") == 2


def test_a_start_that_keeps_losing_workers_gives_up_after_its_attempts() -> None:
    backend = ScriptedBackend()
    backend.lose_next = ["n1", "n2", "n3", "n4"]
    scaler = make(backend, max_start_attempts=2)
    with pytest.raises(TemporaryError, match="worker lost"):
        scaler.acquire()
    assert backend.starts == 2 and scaler.state == ScaleState.ZERO


def test_an_instance_that_fails_while_serving_goes_to_zero_and_the_next_start_avoids_its_lost_node() -> None:
    backend = ScriptedBackend()
    scaler = make(backend)
    endpoint = scaler.acquire()
    scaler.release()
    backend.lost["fn-1"] = ["n0"]
    assert scaler.check_instance()  # the reaper found the lost worker
    assert backend.failed == [("fn-1", "worker lost on n0")] and scaler.state == ScaleState.ZERO
    assert not scaler.instance_failed(endpoint, "seen again by another request")  # once only
    assert scaler.acquire().instance_id == "fn-2"
    assert backend.excluded[-1] == ("n0",)
    assert not scaler.check_instance()  # the new instance lost nothing
    assert scaler.status()["instance_failures"] == 1
