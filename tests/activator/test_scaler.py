"""Scale-from-zero, scale-out and scale-in with a scripted backend and an injected clock, on a
real event loop (the gateway's scaler runs on one; the backend's blocking calls in threads)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from hydraserve.activator.embedded.scaler import FunctionScaler, Instance, ScaleState
from hydraserve.activator.embedded.start_failures import BACKOFF_FIRST_S, MODEL_RECHECK_S
from hydraserve.contracts.function import FunctionConfig
from hydraserve.errors import (
    FunctionFailedError,
    IntegrityError,
    NotFoundError,
    OverloadedError,
    TemporaryError,
    UnsupportedModelError,
)
from hydraserve.testing.fake_backend import ScriptedBackend


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make(backend: ScriptedBackend, clock: Callable[[], float] | None = None, **kw: Any) -> FunctionScaler:
    config = FunctionConfig(name="fn", model_uri="s3://b/m", **kw)
    return FunctionScaler(config, backend, executor=ThreadPoolExecutor(8), clock=clock or Clock())


def run(coro: Coroutine[Any, Any, None]) -> None:
    asyncio.run(asyncio.wait_for(coro, 30))


async def until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.01)


async def started(backend: ScriptedBackend) -> None:
    await asyncio.get_running_loop().run_in_executor(None, backend.started.wait, 5)


def test_concurrent_requests_at_zero_share_one_cold_start() -> None:
    async def body() -> None:
        backend = ScriptedBackend(auto_release=False)
        scaler = make(backend)
        waiters = [asyncio.create_task(scaler.acquire()) for _ in range(5)]
        await started(backend)
        assert scaler.state == ScaleState.STARTING and scaler.status()["waiting"] == 5
        backend.release_start.set()
        got = await asyncio.gather(*waiters)
        assert [i.instance_id for i in got] == ["fn-1"] * 5
        assert backend.starts == 1 and scaler.state == ScaleState.READY and scaler.inflight == 5
    run(body())


def test_failed_start_answers_every_waiter_and_the_next_request_tries_again() -> None:
    async def body() -> None:
        backend = ScriptedBackend()
        backend.fail_next = "worker exited with code 1: bad weights"
        scaler = make(backend)
        results = await asyncio.gather(scaler.acquire(), scaler.acquire(), return_exceptions=True)
        assert all(isinstance(r, TemporaryError) and "bad weights" in r.message for r in results)
        assert scaler.state == ScaleState.ZERO and scaler.status()["waiting"] == 0
        assert (await scaler.acquire()).instance_id == "fn-2"
        assert backend.starts == 2
    run(body())


def test_a_start_that_cannot_succeed_fails_the_function_until_its_model_changes() -> None:
    """A missing model file: every parked request and every later one is answered at once (424,
    not retryable) without another start; a new push (the model's fingerprint changes) lets the
    next request start it, checked at most every MODEL_RECHECK_S."""
    async def body() -> None:
        clock = Clock()
        backend = ScriptedBackend()
        backend.fail_next = NotFoundError("S3 object s3://b/m/tokenizer.json does not exist")
        scaler = make(backend, clock)
        results = await asyncio.gather(scaler.acquire(), scaler.acquire(), return_exceptions=True)
        assert all(isinstance(r, FunctionFailedError) and "tokenizer.json" in r.message for r in results)
        assert scaler.state == ScaleState.FAILED and scaler.status()["failed"]["error_type"] == "not_found_error"
        error = results[0]
        assert isinstance(error, FunctionFailedError)
        assert error.status == 424 and error.to_openai()["error"]["retryable"] is False
        await until(lambda: scaler.failed is not None and scaler.failed.model_fingerprint == "s3://b/m@v1")
        for _ in range(3):
            with pytest.raises(FunctionFailedError):
                await scaler.acquire()
        assert backend.starts == 1, "a failed function is not started again"
        backend.model_version = "v2"  # pushed again
        with pytest.raises(FunctionFailedError):
            await scaler.acquire()  # within the recheck interval: not asked yet
        clock.now += MODEL_RECHECK_S
        instance = await scaler.acquire()
        assert instance.instance_id == "fn-2" and scaler.state == ScaleState.READY and scaler.failed is None
    run(body())


def test_a_failed_function_starts_again_once_its_settings_change() -> None:
    async def body() -> None:
        backend = ScriptedBackend()
        backend.fail_next = UnsupportedModelError("its attention heads are 16 wide")
        scaler = make(backend)
        with pytest.raises(FunctionFailedError):
            await scaler.acquire()
        scaler.update_config(scaler.config.model_copy(update={"model_uri": "s3://b/fixed"}))
        assert scaler.state == ScaleState.ZERO and (await scaler.acquire()).instance_id == "fn-2"
    run(body())


def test_unsupported_and_corrupt_models_fail_the_function_but_a_crash_does_not() -> None:
    async def body() -> None:
        for error, fails in ((UnsupportedModelError("vLLM does not run FooForCausalLM"), True),
                             (IntegrityError("sha256 mismatch"), True),
                             (TemporaryError("worker exited with code -9"), False)):
            backend = ScriptedBackend()
            backend.fail_next = error
            scaler = make(backend)
            with pytest.raises((FunctionFailedError, TemporaryError)) as caught:
                await scaler.acquire()
            assert isinstance(caught.value, FunctionFailedError) is fails, error
            assert (scaler.state == ScaleState.FAILED) is fails
            await scaler.shutdown()
    run(body())


def test_transient_start_failures_back_off_exponentially_and_a_success_resets_it() -> None:
    async def body() -> None:
        backend = ScriptedBackend()
        scaler = make(backend)
        backend.fail_next = "worker not ready within 180 s"
        with pytest.raises(TemporaryError) as caught:
            await scaler.acquire()
        assert caught.value.retry_after_s == BACKOFF_FIRST_S
        status = scaler.status()
        assert status["start_failures"] == 1 and 0 < status["next_start_in_s"] <= BACKOFF_FIRST_S
        loop = asyncio.get_running_loop()
        began = loop.time()
        backend.fail_next = "worker not ready within 180 s"
        with pytest.raises(TemporaryError) as caught:
            await scaler.acquire()  # parked until the backoff ends, then its start fails too
        assert loop.time() - began >= BACKOFF_FIRST_S * 0.9 and backend.starts == 2
        assert caught.value.retry_after_s == 2 * BACKOFF_FIRST_S and scaler.status()["start_failures"] == 2
        began = loop.time()
        instance = await scaler.acquire()
        assert loop.time() - began >= 2 * BACKOFF_FIRST_S * 0.9, "the second backoff is twice the first"
        assert instance.instance_id == "fn-3" and scaler.status()["start_failures"] == 0
    run(body())


def test_queue_bound_rejects_excess_waiters_with_retry_after() -> None:
    async def body() -> None:
        backend = ScriptedBackend(auto_release=False)
        scaler = make(backend, max_queue=2)
        waiters = [asyncio.create_task(scaler.acquire()) for _ in range(2)]
        await started(backend)
        with pytest.raises(OverloadedError, match="already waiting") as full:
            await scaler.acquire()
        assert full.value.retry_after_s == 1.0
        backend.release_start.set()
        await asyncio.gather(*waiters)
    run(body())


def test_request_deadline_while_starting() -> None:
    async def body() -> None:
        backend = ScriptedBackend(auto_release=False)
        scaler = make(backend, time.monotonic, request_timeout_s=0.2)
        with pytest.raises(OverloadedError, match="no instance free within"):
            await scaler.acquire()
        assert scaler.status()["waiting"] == 0
        backend.release_start.set()
    run(body())


def test_a_parked_request_cancelled_by_its_client_leaves_no_slot_taken() -> None:
    async def body() -> None:
        backend = ScriptedBackend(auto_release=False)
        scaler = make(backend)
        parked = asyncio.create_task(scaler.acquire())
        await started(backend)
        parked.cancel()  # the client went away
        backend.release_start.set()
        await until(lambda: scaler.state == ScaleState.READY)
        assert scaler.inflight == 0 and scaler.status()["waiting"] == 0
    run(body())


def test_idle_scale_in_uses_the_injected_clock() -> None:
    async def body() -> None:
        clock = Clock()
        backend = ScriptedBackend()
        scaler = make(backend, clock, idle_timeout_s=30)
        instance = await scaler.acquire()
        clock.now += 100
        assert await scaler.scale_in_idle(clock.now) == 0, "a request is still in flight"
        scaler.release(instance)
        clock.now += 29
        assert await scaler.scale_in_idle(clock.now) == 0
        clock.now += 1
        assert await scaler.scale_in_idle(clock.now) == 1
        assert not scaler.instances  # out of the table at once: no request can take it now
        await until(lambda: scaler.state == ScaleState.ZERO)  # stopping until the backend has it down
        assert backend.stops == ["fn-1"]
        assert (await scaler.acquire()).instance_id == "fn-2", "a request after scale-in cold-starts again"
    run(body())


def test_demand_over_the_concurrency_starts_more_instances_and_requests_go_to_the_least_loaded() -> None:
    async def body() -> None:
        clock = Clock()
        backend = ScriptedBackend()
        scaler = make(backend, clock, concurrency=2, max_instances=3, idle_timeout_s=30)
        first = [await scaler.acquire() for _ in range(2)]  # fn-1 full
        more = [asyncio.create_task(scaler.acquire()) for _ in range(3)]  # 5 wanted: 3 instances
        await until(lambda: backend.starts == 3 and len(scaler.instances) == 3 and all(t.done() for t in more))
        placed = [t.result().instance_id for t in more]
        assert sorted(placed) == ["fn-2", "fn-2", "fn-3"] or sorted(placed) == ["fn-2", "fn-3", "fn-3"]
        for instance in first:
            scaler.release(instance)
        assert (await scaler.acquire()).instance_id == "fn-1"  # now the least loaded
        extra = [await scaler.acquire() for _ in range(2)]
        assert sorted(i.inflight for i in scaler.instances.values()) == [2, 2, 2]
        beyond = asyncio.create_task(scaler.acquire())  # 6 slots, 6 taken: it waits (max_instances 3)
        await asyncio.sleep(0.1)
        assert not beyond.done() and backend.starts == 3
        scaler.release(more[0].result())
        assert (await asyncio.wait_for(beyond, 5)).instance_id == more[0].result().instance_id
        for instance in (*(t.result() for t in (*more[1:], beyond)), *extra):
            scaler.release(instance)
        clock.now += 60  # one instance keeps a request; the others are idle
        busy = {i.instance_id for i in scaler.instances.values() if i.inflight}
        assert await scaler.scale_in_idle(clock.now) == 3 - len(busy)
        assert set(scaler.instances) == busy
    run(body())


def test_a_failed_scale_out_start_does_not_fail_requests_another_instance_can_serve() -> None:
    async def body() -> None:
        backend = ScriptedBackend()
        scaler = make(backend, concurrency=1, max_instances=2)
        held = await scaler.acquire()
        backend.fail_next = "no capacity"
        waiting = asyncio.create_task(scaler.acquire())
        await until(lambda: backend.starts == 2 and scaler.status()["starting"] == 0)
        assert not waiting.done(), "it waits for fn-1's slot instead of failing"
        scaler.release(held)
        assert (await asyncio.wait_for(waiting, 5)).instance_id == "fn-1"
    run(body())


def test_a_start_that_loses_a_worker_is_tried_again_avoiding_its_node_while_requests_wait() -> None:
    async def body() -> None:
        backend = ScriptedBackend()
        backend.lose_next = ["n1", "n2"]
        scaler = make(backend)
        assert (await scaler.acquire()).instance_id == "fn-3"  # the waiter never saw the two failures
        assert backend.excluded == [(), ("n1",), ("n1", "n2")]
        timeline = scaler.last_timeline
        assert timeline is not None and [e.name for e in timeline.events].count("cold_start_retry") == 2
    run(body())


def test_a_start_that_keeps_losing_workers_gives_up_after_its_attempts() -> None:
    async def body() -> None:
        backend = ScriptedBackend()
        backend.lose_next = ["n1", "n2", "n3", "n4"]
        scaler = make(backend, max_start_attempts=2)
        with pytest.raises(TemporaryError, match="worker lost"):
            await scaler.acquire()
        assert backend.starts == 2 and scaler.state == ScaleState.ZERO
    run(body())


def test_an_instance_that_fails_while_serving_is_dropped_and_the_next_start_avoids_its_lost_node() -> None:
    async def body() -> None:
        backend = ScriptedBackend()
        scaler = make(backend)
        instance: Instance = await scaler.acquire()
        scaler.release(instance)
        backend.lost["fn-1"] = ["n0"]
        assert await scaler.check_instances() == 1  # the reaper found the lost worker
        assert not scaler.instances
        await until(lambda: scaler.state == ScaleState.ZERO)  # stopping while the backend tears it down
        assert not scaler.instance_failed(instance, "seen again by another request")  # once only
        await until(lambda: backend.failed == [("fn-1", "worker lost on n0")])
        assert (await scaler.acquire()).instance_id == "fn-2"
        assert backend.excluded[-1] == ("n0",)
        assert await scaler.check_instances() == 0  # the new instance lost nothing
        assert scaler.status()["instance_failures"] == 1
    run(body())


def test_requests_parked_when_an_instance_fails_wait_for_its_replacement() -> None:
    async def body() -> None:
        backend = ScriptedBackend()
        scaler = make(backend, concurrency=1, max_instances=1)
        held = await scaler.acquire()
        parked = asyncio.create_task(scaler.acquire())
        await asyncio.sleep(0.05)
        backend.lost["fn-1"] = ["n0"]
        assert scaler.instance_failed(held, "worker lost on n0")
        scaler.release(held)  # its request ended with the failure
        assert (await asyncio.wait_for(parked, 5)).instance_id == "fn-2"
        assert backend.excluded == [(), ("n0",)]
    run(body())


def test_shutdown_answers_parked_requests_and_stops_every_instance() -> None:
    async def body() -> None:
        backend = ScriptedBackend()
        scaler = make(backend, concurrency=1, max_instances=1)
        await scaler.acquire()
        parked = asyncio.create_task(scaler.acquire())
        await asyncio.sleep(0.05)
        await scaler.shutdown()
        with pytest.raises(TemporaryError, match="shutting down"):
            await parked
        assert backend.stops == ["fn-1"] and scaler.state == ScaleState.ZERO
    run(body())


def test_an_instance_taken_while_another_is_being_stopped_is_not_stopped() -> None:
    """Scale-in takes every idle instance out before it waits on any stop: a request arriving
    while the first stops cannot land on the second and then lose it."""
    async def body() -> None:
        clock = Clock()
        backend = ScriptedBackend()
        scaler = make(backend, clock, concurrency=1, max_instances=2, idle_timeout_s=30)
        a, b = await scaler.acquire(), await scaler.acquire()
        scaler.release(a)
        scaler.release(b)
        clock.now += 60
        assert await scaler.scale_in_idle(clock.now) == 2 and not scaler.instances
        fresh = await scaler.acquire()  # arrives while both stop: a new instance, not a stopped one
        assert fresh.instance_id not in {a.instance_id, b.instance_id}
        await until(lambda: sorted(backend.stops) == sorted([a.instance_id, b.instance_id]))
    run(body())


def test_requests_just_handed_a_slot_are_not_counted_twice_as_demand() -> None:
    """Parked requests handed every slot of a new instance in one tick are running, not waiting:
    a request arriving before their tasks resume must not start a second instance for them."""
    async def body() -> None:
        backend = ScriptedBackend(auto_release=False)
        scaler = make(backend, concurrency=4, max_instances=3)
        parked = [asyncio.create_task(scaler.acquire()) for _ in range(4)]
        await started(backend)
        seen: list[int] = []
        # runs after the first parked task resumed and before the other three do
        scaler._queue[0].add_done_callback(lambda _f: seen.append(scaler._wanted_instances()))
        backend.release_start.set()
        await asyncio.gather(*parked)
        assert seen == [1] and backend.starts == 1
    run(body())


def test_the_replicas_a_consolidated_group_becomes_take_parked_requests_and_scale_in_on_their_own() -> None:
    """The reaper adds each replica the backend hands out as an instance: parked requests get its
    slots at once, requests go to the least loaded, and each scales in by its own idle time."""
    from hydraserve.contracts.backend import Endpoint

    async def body() -> None:
        backend = ScriptedBackend()
        clock = Clock()
        scaler = make(backend, clock, concurrency=1, max_instances=1, idle_timeout_s=10)
        held = await scaler.acquire()
        parked = asyncio.create_task(scaler.acquire())
        await asyncio.sleep(0.05)
        assert not parked.done() and backend.starts == 1  # max_instances: no second cold start
        backend.replicas["fn-1"] = [Endpoint(url="http://127.0.0.1:10", instance_id="fn-1-s1")]
        assert await scaler.check_instances() == 0
        assert (await asyncio.wait_for(parked, 5)).instance_id == "fn-1-s1"
        assert await scaler.check_instances() == 0 and len(scaler.instances) == 2  # handed out once
        assert scaler.status()["replicas"] == 1 and backend.starts == 1
        scaler.release(held)
        clock.now += 11  # fn-1 idle; fn-1-s1 still serves its request
        assert await scaler.scale_in_idle(clock.now) == 1
        await until(lambda: backend.stops == ["fn-1"])
        assert list(scaler.instances) == ["fn-1-s1"]
    run(body())


def test_a_replica_handed_out_after_shutdown_is_stopped() -> None:
    from hydraserve.contracts.backend import Endpoint

    async def body() -> None:
        backend = ScriptedBackend()
        scaler = make(backend)
        scaler.release(await scaler.acquire())
        backend.replicas["fn-1"] = [Endpoint(url="http://127.0.0.1:10", instance_id="fn-1-s1")]
        scaler._closed = True  # shutdown began between the reaper's two backend calls
        await scaler.check_instances()
        await until(lambda: backend.stops == ["fn-1-s1"])
        assert "fn-1-s1" not in scaler.instances
    run(body())


async def _periodic_history(scaler: FunctionScaler, clock: Clock, period_s: float, n: int) -> None:
    """``n`` one-second invocations every ``period_s``."""
    for _ in range(n):
        instance = await scaler.acquire()
        clock.now += 1.0
        scaler.release(instance)
        clock.now += period_s - 1.0


def test_a_periodic_function_goes_to_zero_at_once_and_is_prewarmed_before_its_next_call() -> None:
    """Every 10 minutes: the histogram says pre-warm at ~8 min, keep to ~11 min after the last
    call. The instance stops at the next reaper tick instead of idling 30 s, and the weights
    are asked for once the pre-warm window has passed, once, held for the keep-alive window."""
    async def body() -> None:
        backend = ScriptedBackend()
        clock = Clock()
        scaler = make(backend, clock)
        await _periodic_history(scaler, clock, 600.0, 12)
        decision = scaler.keep_alive()
        assert decision.reason == "histogram" and 450 <= decision.prewarm_s < 600
        assert await scaler.scale_in_idle(clock.now - 599.0 + 1.0) == 1  # one second after the last call ended
        await until(lambda: len(backend.stops) == 1)
        since = scaler.history.idle_since
        assert since is not None
        assert not await scaler.prewarm_if_due(since + decision.prewarm_s - 1)
        assert await scaler.prewarm_if_due(since + decision.prewarm_s)
        assert not await scaler.prewarm_if_due(since + decision.prewarm_s + 5)  # once per idle period
        await until(lambda: backend.prewarmed == [("fn", decision.keep_alive_s)])
        assert scaler.status()["prewarms"] == 1
    run(body())


def test_a_function_with_little_history_or_a_fixed_policy_keeps_its_idle_timeout_and_is_never_prewarmed() -> None:
    async def body() -> None:
        for policy, calls in (("histogram", 5), ("fixed", 12)):
            backend = ScriptedBackend()
            clock = Clock()
            scaler = make(backend, clock, keep_alive=policy, idle_timeout_s=30.0)
            await _periodic_history(scaler, clock, 600.0, calls)
            decision = scaler.keep_alive()
            assert decision.prewarm_s == 0 and decision.keep_alive_s == 30.0, (policy, decision)
            last = clock.now - 599.0
            assert await scaler.scale_in_idle(last + 29.0) == 0 and await scaler.scale_in_idle(last + 30.0) == 1
            assert not await scaler.prewarm_if_due(last + 3600)
            assert backend.prewarmed == []
    run(body())


def test_with_a_prewarm_window_an_instance_idle_under_load_is_kept_and_a_backend_that_cannot_prewarm_keeps_all() -> None:
    """The pre-warm path stops instances at once only when the whole function is idle: while
    another instance still serves, an idle one keeps idle_timeout_s (no stop-start flapping).
    A backend that cannot pre-warm (no loaderd to fill) keeps instances to the window's end."""
    from hydraserve.contracts.backend import Endpoint

    async def body() -> None:
        backend = ScriptedBackend()
        clock = Clock()
        scaler = make(backend, clock, concurrency=1, idle_timeout_s=30.0)
        await _periodic_history(scaler, clock, 600.0, 12)
        assert scaler.keep_alive().prewarm_s > 0
        backend.replicas["fn-1"] = [Endpoint(url="http://127.0.0.1:10", instance_id="fn-1-s1")]
        await scaler.check_instances()  # two instances now
        busy = await scaler.acquire()
        assert busy.instance_id == "fn-1-s1" or busy.instance_id == "fn-1"
        clock.now += 5
        assert await scaler.scale_in_idle(clock.now) == 0  # the other idles 5 s while the function is busy
        clock.now += 30
        assert await scaler.scale_in_idle(clock.now) == 1  # ... and goes after idle_timeout_s
        scaler.release(busy)
        assert await scaler.scale_in_idle(clock.now + 1) == 1  # the function idle: the last one goes at once

        backend.can_prewarm = False  # type: ignore[misc]
        decision = scaler.keep_alive()
        assert decision.prewarm_s == 0 and decision.keep_alive_s > 450  # kept to the window's end instead
        assert not await scaler.prewarm_if_due(clock.now + 3600)
    run(body())


def test_an_update_lets_parked_requests_on_at_once_and_the_next_start_uses_it() -> None:
    """`fn update` while requests wait: a higher concurrency hands them the running instance's
    free slots, a higher max_instances starts another instance, with the new settings, for them."""
    async def body() -> None:
        backend = ScriptedBackend()
        scaler = make(backend, concurrency=1, max_instances=1)
        first = await scaler.acquire()
        parked = asyncio.create_task(scaler.acquire())
        await until(lambda: scaler.status()["waiting"] == 1)
        scaler.update_config(scaler.config.model_copy(update={"concurrency": 2}))
        assert await asyncio.wait_for(parked, 1) is first and backend.starts == 1
        parked = asyncio.create_task(scaler.acquire())
        await until(lambda: scaler.status()["waiting"] == 1)
        scaler.update_config(scaler.config.model_copy(update={"max_instances": 2, "ttft_slo_s": 5.0}))
        assert await asyncio.wait_for(parked, 5) is not first
        assert [c.ttft_slo_s for c in backend.started_with] == [7.5, 5.0]
        with pytest.raises(ValueError, match="cannot become"):
            scaler.update_config(scaler.config.model_copy(update={"name": "other"}))
    run(body())
