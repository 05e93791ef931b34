"""Per-function scaling: park requests through cold starts, route each to the least-loaded
instance, scale out while demand exceeds the instances' concurrency, scale in when idle.

Runs on the gateway's event loop; a parked request is one future in a FIFO (a few hundred
bytes), never a thread. ``acquire`` returns an instance with a free slot (``concurrency``
requests at once, 0 = unlimited) or parks the request, bounded by ``max_queue`` and
``request_timeout_s``. While parked and running requests need more slots than the instances
(ready and starting) have, another cold start begins, up to ``max_instances``. A start that lost
a worker is tried again at once on a plan avoiding that node (up to ``max_start_attempts``); a
start that fails while no other instance is up or coming fails every parked request with the
reason (503, Retry-After), and the next start waits out a backoff (doubling per failure, capped).
A start that fails for a reason no retry can fix (a model file missing, an unsupported or
corrupt model: ``fails_every_start``) marks the function failed: every request is answered at
once with the reason (424, not retryable) and nothing starts again until the function's settings
(``update_config``) or its model (a new push: its fingerprint, asked at most every few seconds)
change. An instance that fails while serving
(``instance_failed``: the gateway saw it, or the reaper found a worker lost) is failed in the
backend and dropped; the next start avoids its lost nodes. A pipeline group that consolidated
into several replicas (its other full workers) adds each as an instance at the next reaper tick. Backend calls block (a cold start
takes seconds), so they run in the gateway's thread pool. The clock is injected so the reaper
and tests decide idleness with it.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, TypeVar

from hydraserve.activator.embedded.metrics import GatewayMetrics
from hydraserve.activator.embedded.start_failures import StartFailure, StartFailures
from hydraserve.activator.embedded.usage import FunctionUsage
from hydraserve.contracts.backend import Endpoint, FunctionBackend
from hydraserve.contracts.function import FunctionConfig
from hydraserve.contracts.timeline import Moment, Timeline
from hydraserve.errors import (
    HydraError,
    InstanceFailedError,
    OverloadedError,
    TemporaryError,
    fails_every_start,
)
from hydraserve.provider.keepalive import (
    InvocationHistory,
    KeepAlive,
    PolicySettings,
    instance_keep_alive_s,
    without_prewarm,
)

log = logging.getLogger(__name__)

T = TypeVar("T")



class ScaleState(StrEnum):
    ZERO = "zero"
    FAILED = "failed"
    STARTING = "starting"
    READY = "ready"
    STOPPING = "stopping"


@dataclass(eq=False)
class Instance:
    """One ready instance and the requests it is serving."""

    endpoint: Endpoint
    timeline: Timeline
    last_active: float
    inflight: int = 0
    first_response_pending: bool = True

    @property
    def instance_id(self) -> str:
        return self.endpoint.instance_id


def _handed_a_slot(waiter: asyncio.Future[Instance]) -> bool:
    return waiter.done() and not waiter.cancelled() and waiter.exception() is None


class FunctionScaler:
    """Scaling state of one function; every method runs on the gateway's event loop."""

    def __init__(self, config: FunctionConfig, backend: FunctionBackend, *, executor: Executor | None = None,
                 metrics: GatewayMetrics | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self._backend = backend
        self._executor = executor
        self._metrics = metrics or GatewayMetrics()
        self._clock = clock
        self.instances: dict[str, Instance] = {}
        self._queue: deque[asyncio.Future[Instance]] = deque()  # parked requests, oldest first
        self._waiting = 0
        self._handed = 0  # parked requests handed a slot whose task has not resumed yet (not demand)
        self._starting = 0
        self._failing = 0  # failed instances the backend is still tearing down
        self._stopping = 0  # idle instances the backend is stopping
        self.start_failures = StartFailures(config.name, self._metrics, clock, resume=self._scale_out)
        self._closed = False
        self._avoid_next: tuple[str, ...] = ()  # nodes the next cold start avoids (lost workers)
        self._tasks: set[asyncio.Task[None]] = set()
        self.last_failure: str | None = None
        self.last_timeline: Timeline | None = None
        self.history = InvocationHistory(settings=PolicySettings(fixed_keep_alive_s=config.idle_timeout_s))
        self._prewarmed = False  # this idle period's pre-warm was asked for
        self.prewarms = 0
        self.cold_starts = 0  # instances that became ready
        self.replicas = 0  # instances that came from a consolidated group's other full workers
        self.instance_failures = 0
        self.usage = FunctionUsage(config.name, self._metrics)
        self._accrued_at = clock()

    # request path ------------------------------------------------------------------------
    @property
    def failed(self) -> StartFailure | None:
        """Why the function cannot start until it or its model changes (None: it can)."""
        return self.start_failures.failed

    @property
    def state(self) -> ScaleState:
        if self.instances:
            return ScaleState.READY
        if self._starting:
            return ScaleState.STARTING
        if self.failed is not None:
            return ScaleState.FAILED
        return ScaleState.STOPPING if self._stopping or self._failing else ScaleState.ZERO

    async def acquire(self) -> Instance:
        """A slot on an instance for one request (parked through a cold start); pair with release()."""
        if self._closed:
            raise TemporaryError(f"function {self.config.name} is shutting down", retry_after_s=1.0)
        if self.failed is not None and not self.instances:
            if self.start_failures.check_due():
                self.start_failures.model_is(await self._model_fingerprint())
            if self.failed is not None:
                raise self.start_failures.error(self.config.model_uri)
        if not self._waiting and not self.inflight:  # the function turns busy: its idle time ends
            self.history.busy(self._clock())
            self._prewarmed = False  # the next idle period may pre-warm again
        instance = self._free_instance()
        if instance is not None and not self._waiting:  # first come, first served
            return self._take(instance)
        if self._waiting >= self.config.max_queue:
            raise OverloadedError(f"function {self.config.name}: {self._waiting} requests already waiting",
                                  retry_after_s=1.0)
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[Instance] = loop.create_future()
        timer = loop.call_later(self.config.request_timeout_s, self._expire, waiter)
        self._queue.append(waiter)
        self._waiting += 1
        self._metrics.waiting.labels(self.config.name).inc()
        try:
            self._scale_out()
            self._dispatch()
            return await waiter
        except asyncio.CancelledError:  # the client went away while parked
            if _handed_a_slot(waiter):
                self.release(waiter.result())  # a slot it will never use
            raise
        finally:
            timer.cancel()
            if _handed_a_slot(waiter):
                self._handed -= 1
            self._waiting -= 1
            self._metrics.waiting.labels(self.config.name).dec()
            self._maybe_idle()

    @property
    def starting(self) -> int:
        """Cold starts under way."""
        return self._starting

    def must_wait(self) -> bool:
        """Whether a request arriving now would be parked (no free slot), rather than served or
        refused at once (failed, queue full, shutting down)."""
        return (self._free_instance() is None or self._waiting > 0) and self.failed is None \
            and not self._closed and self._waiting < self.config.max_queue

    def release(self, instance: Instance) -> None:
        instance.inflight -= 1
        instance.last_active = self._clock()
        self._dispatch()
        self._maybe_idle()

    def _maybe_idle(self) -> None:
        if not self._waiting and not self.inflight:
            self.history.idle(self._clock())

    def first_response(self, instance: Instance) -> None:
        """The proxy saw the instance's first response byte: close its cold start's timeline."""
        if instance.first_response_pending:
            instance.timeline.mark(Moment.FIRST_RESPONSE_BYTE, component="gateway")
            instance.first_response_pending = False

    def _free_instance(self) -> Instance | None:
        """The least-loaded instance with a free slot."""
        limit = self.config.concurrency or math.inf
        free = [i for i in self.instances.values() if i.inflight < limit]
        return min(free, key=lambda i: i.inflight) if free else None

    def _take(self, instance: Instance) -> Instance:
        instance.inflight += 1
        instance.last_active = self._clock()
        return instance

    def _dispatch(self) -> None:
        """Hand free slots to parked requests, oldest first."""
        while self._queue:
            if self._queue[0].done():  # expired or cancelled
                self._queue.popleft()
                continue
            instance = self._free_instance()
            if instance is None:
                return
            self._queue.popleft().set_result(self._take(instance))
            self._handed += 1

    def _expire(self, waiter: asyncio.Future[Instance]) -> None:
        if not waiter.done():
            waiter.set_exception(OverloadedError(
                f"function {self.config.name}: no instance free within {self.config.request_timeout_s:g} s",
                retry_after_s=1.0))

    def _fail_waiters(self, error: HydraError) -> None:
        while self._queue:
            future = self._queue.popleft()
            if not future.done():
                future.set_exception(error)

    # scale out ---------------------------------------------------------------------------
    def _wanted_instances(self) -> int:
        demand = self._waiting - self._handed + sum(i.inflight for i in self.instances.values())
        if demand == 0:
            return 0
        wanted = math.ceil(demand / self.config.concurrency) if self.config.concurrency else 1
        return min(wanted, self.config.max_instances)

    def _scale_out(self) -> None:
        """Begin cold starts while the demand needs more instances than are up or coming."""
        if self._closed or self.start_failures.holding:
            return  # a failed function starts again once it changes; a backoff's end calls again
        have = len(self.instances) + self._starting + self._failing  # a failing one's replacement waits
        for _ in range(self._wanted_instances() - have):
            self._begin_start()

    def _begin_start(self) -> None:
        self._starting += 1
        self._metrics.cold_starts.labels(self.config.name).inc()
        timeline = Timeline()
        timeline.mark(Moment.REQUEST_RECEIVED, component="gateway")
        self.last_timeline = timeline
        avoid, self._avoid_next = self._avoid_next, ()
        self._spawn(self._cold_start(timeline, avoid))

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _blocking(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def _start_avoiding_lost_nodes(self, timeline: Timeline, avoid: tuple[str, ...]) -> Endpoint:
        """backend.start, tried again on a fresh plan while attempts lose workers (in a thread)."""
        for attempt in range(1, self.config.max_start_attempts + 1):
            try:
                return self._backend.start(self.config, timeline, avoid)
            except InstanceFailedError as exc:
                if not exc.nodes or attempt == self.config.max_start_attempts or self._closed:
                    raise
                avoid = tuple(dict.fromkeys((*avoid, *exc.nodes)))
                log.warning("cold start of %s lost a worker, starting again without %s: %s",
                            self.config.name, ", ".join(avoid), exc.message)
                timeline.mark(Moment.COLD_START_RETRY, component="gateway", avoid=list(avoid), reason=exc.message[:200])
        raise AssertionError("unreachable")

    async def _cold_start(self, timeline: Timeline, avoid: tuple[str, ...]) -> None:
        try:
            endpoint = await self._blocking(self._start_avoiding_lost_nodes, timeline, avoid)
        except Exception as exc:  # any failure must answer the parked requests
            self._starting -= 1
            await self._start_failed(exc)
            return
        self._starting -= 1
        self.start_failures.succeeded()
        ready = timeline.mark(Moment.INSTANCE_READY, component="gateway")
        self.usage.cold_start(ready.at - timeline.events[0].at)
        if self._closed:  # the gateway shut down while it started
            await self._blocking(self._backend.stop, self.config.name, endpoint.instance_id)
            return
        self.instances[endpoint.instance_id] = Instance(endpoint, timeline, last_active=self._clock())
        self.cold_starts += 1
        self.last_failure = None
        self._dispatch()

    async def _start_failed(self, exc: Exception) -> None:
        """Back off before the next start; with nothing else serving or coming, answer the parked
        requests, and fail the function if no retry can help."""
        reason = exc.message if isinstance(exc, HydraError) else f"{type(exc).__name__}: {exc}"
        log.warning("cold start of %s failed: %s", self.config.name, reason)
        self.last_failure = reason
        backoff_s = self.start_failures.failed_once()
        if self.instances or self._starting or self._failing:  # others serve or come: the parked requests wait for them
            return
        if not fails_every_start(exc):
            self._fail_waiters(TemporaryError(f"function {self.config.name} failed to start: {reason}",
                                              retry_after_s=backoff_s))
            return
        failure = self.start_failures.fail_for_good(reason, exc.error_type if isinstance(exc, HydraError)
                                                    else "internal_error")
        self._fail_waiters(self.start_failures.error(self.config.model_uri))
        self.start_failures.failed_on(failure, await self._model_fingerprint())

    async def _model_fingerprint(self) -> str | None:
        try:
            return await self._blocking(self._backend.model_fingerprint, self.config)
        except Exception as exc:  # storage unreachable: unknown, asked again at the next check
            log.warning("could not read the fingerprint of %s's model: %s", self.config.name, exc)
            return None

    # failures while serving ---------------------------------------------------------------
    def instance_failed(self, instance: Instance, reason: str) -> bool:
        """``instance`` cannot serve: drop it now and fail it in the backend in the background;
        a replacement (if requests need one) starts after that, avoiding the nodes it lost.
        True if this call did it (the first of several requests that saw the same failure)."""
        if self.instances.get(instance.instance_id) is not instance:
            return False
        del self.instances[instance.instance_id]
        self.instance_failures += 1
        self._metrics.instance_failures.labels(self.config.name).inc()
        self.last_failure = reason
        log.warning("instance %s of %s failed: %s", instance.instance_id, self.config.name, reason)
        self._failing += 1
        self._spawn(self._fail_in_backend(instance, reason))
        return True

    async def _fail_in_backend(self, instance: Instance, reason: str) -> None:
        lost: tuple[str, ...] = ()
        try:
            lost = await self._blocking(self._backend.fail, self.config.name, instance.instance_id, reason)
        except Exception:
            log.exception("failing instance %s in the backend failed", instance.instance_id)
        finally:
            self._failing -= 1
            self._avoid_next = tuple(dict.fromkeys((*self._avoid_next, *lost)))
            self._scale_out()  # parked requests need a fresh instance

    async def accrue_usage(self) -> None:
        """Reaper tick: the seconds since the last, for each instance up and the memory it holds."""
        now = self._clock()
        seconds, self._accrued_at = now - self._accrued_at, now
        memory = [await self._blocking(self._backend.instance_memory_gb, i.instance_id)
                  for i in list(self.instances.values())]
        self.usage.accrue(memory, seconds)

    async def check_instances(self) -> int:
        """Reaper tick: fail instances whose backend lost a worker (how many it failed) and
        route to the replicas the others became."""
        failed = 0
        for instance in list(self.instances.values()):
            lost = await self._blocking(self._backend.lost_nodes, instance.instance_id)
            if lost and self.instance_failed(instance, f"worker lost on {', '.join(lost)}"):
                failed += 1
            elif not lost:
                for endpoint in await self._blocking(self._backend.take_replicas, instance.instance_id):
                    self._add_replica(endpoint, instance)
        return failed

    def _add_replica(self, endpoint: Endpoint, origin: Instance) -> None:
        """A consolidated group's other full worker serves on its own: one more instance."""
        if self._closed:
            self._stopping += 1
            self._spawn(self._stop_in_backend(Instance(endpoint, Timeline(), last_active=self._clock())))
            return
        timeline = Timeline()
        timeline.mark(Moment.REPLICA_READY, component="gateway", of=origin.instance_id)
        self.instances[endpoint.instance_id] = Instance(endpoint, timeline, last_active=self._clock(),
                                                        first_response_pending=False)
        self.replicas += 1
        self._metrics.replicas.labels(self.config.name).inc()
        log.info("instance %s of %s became a replica too: %s", origin.instance_id, self.config.name,
                 endpoint.instance_id)
        self._dispatch()

    # scale in, keep alive, pre-warm -----------------------------------------------------------
    def keep_alive(self) -> KeepAlive:
        """What to do after the last request: the function's own history (keep_alive histogram),
        or idle_timeout_s."""
        if self.config.keep_alive == "fixed":
            return KeepAlive(0.0, self.config.idle_timeout_s, "fixed")
        decision = self.history.decision()
        return decision if self._backend.can_prewarm else without_prewarm(decision)

    def _keep_alive_s(self) -> float:
        return instance_keep_alive_s(self.keep_alive(), self.history.idle_since is not None,
                                     self.config.idle_timeout_s)

    async def scale_in_idle(self, now: float) -> int:
        """Stop instances that served nothing for the keep-alive while nothing waits; how many.
        They leave the table before any await (a request arriving meanwhile cannot take one), and
        are stopped in the background (a slow drain does not hold up the reaper)."""
        if self._waiting:
            return 0
        keep_s = self._keep_alive_s()
        idle = [i for i in self.instances.values() if i.inflight == 0 and now - i.last_active >= keep_s]
        for instance in idle:
            del self.instances[instance.instance_id]
            log.info("instance %s of %s idle for %.0f s: stopping it", instance.instance_id,
                     self.config.name, keep_s)
            self._stopping += 1
            self._spawn(self._stop_in_backend(instance))
        return len(idle)

    async def prewarm_if_due(self, now: float) -> bool:
        """Reaper tick: once the function, at zero, has been idle for its pre-warm window, have
        its weights fetched into a node's loaderd (held there for the keep-alive window), so its
        next cold start finds them resident; True if this call asked."""
        decision = self.keep_alive()
        since = self.history.idle_since
        if (self._prewarmed or self._closed or decision.prewarm_s <= 0 or since is None or self.instances
                or self._starting or self._stopping or self._failing or now - since < decision.prewarm_s):
            return False
        self._prewarmed = True
        self.prewarms += 1
        self._metrics.prewarms.labels(self.config.name).inc()
        self._spawn(self._prewarm_in_backend(decision.keep_alive_s))
        return True

    async def _prewarm_in_backend(self, hold_s: float) -> None:
        try:
            fetched = await self._blocking(self._backend.prewarm, self.config, hold_s)
            log.info("pre-warmed %s: %d bytes fetched, held %.0f s", self.config.name, fetched, hold_s)
        except Exception:
            log.exception("pre-warming %s failed", self.config.name)

    async def _stop_in_backend(self, instance: Instance) -> None:
        try:
            await self._blocking(self._backend.stop, self.config.name, instance.instance_id)
        except Exception:
            log.exception("stopping instance %s failed", instance.instance_id)
        finally:
            self._stopping -= 1

    async def drain(self, timeout_s: float) -> bool:
        """Wait (up to ``timeout_s``) until no request is parked or running; True if none is."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while (self._waiting or self.inflight) and loop.time() < deadline:
            await asyncio.sleep(0.05)
        return not (self._waiting or self.inflight)

    async def shutdown(self) -> None:
        """Stop every instance now and answer parked requests (gateway exit, function deleted)."""
        self._closed = True
        self.start_failures.cancel()
        self._fail_waiters(TemporaryError(f"function {self.config.name} is shutting down", retry_after_s=1.0))
        instances, self.instances = list(self.instances.values()), {}
        for instance in instances:
            self._stopping += 1
            self._spawn(self._stop_in_backend(instance))
        if self._tasks:  # cold starts under way stop their instance when they finish
            await asyncio.wait(list(self._tasks), timeout=30)

    def update_config(self, config: FunctionConfig) -> None:
        """Swap in new settings (`fn update`): the next cold start and the gateway's own limits use
        them at once; instances already running serve on as they started, until they scale in."""
        if config.name != self.config.name:
            raise ValueError(f"function {self.config.name} cannot become {config.name}")
        self.config = config
        self.history.settings = PolicySettings(fixed_keep_alive_s=config.idle_timeout_s)
        if self.failed is not None:
            log.info("failed function %s changed: it may start again", config.name)
        self.start_failures.clear()
        self._dispatch()  # a higher concurrency has free slots for parked requests
        self._scale_out()  # a higher max_instances may start another for them

    @property
    def endpoints(self) -> list[Endpoint]:
        """The ready instances' endpoints, oldest first."""
        return [i.endpoint for i in list(self.instances.values())]

    @property
    def inflight(self) -> int:
        return sum(i.inflight for i in self.instances.values())

    def status(self) -> dict[str, object]:
        return {"name": self.config.name, "model_uri": self.config.model_uri, "state": self.state.value, "inflight": self.inflight,
                "waiting": self._waiting, "starting": self._starting, "cold_starts": self.cold_starts,
                "replicas": self.replicas, "prewarms": self.prewarms,
                "keep_alive": {"prewarm_s": (ka := self.keep_alive()).prewarm_s, "keep_alive_s": ka.keep_alive_s,
                               "reason": ka.reason},
                "instance_failures": self.instance_failures, "last_failure": self.last_failure,
                "usage": self.usage.as_dict(),
                **self.start_failures.status(),
                "instances": [{"id": i.instance_id, "url": i.endpoint.url, "inflight": i.inflight}
                              for i in self.instances.values()]}
