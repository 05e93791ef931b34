"""A FunctionBackend whose instances are controllable in-process stand-ins.

For unit tests of the gateway's state machine only (buffering, failure, idle); the
end-to-end tests use the real local-process backend with real workers.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

from hydraserve.contracts.backend import Endpoint, WorkerLog
from hydraserve.contracts.function import FunctionConfig
from hydraserve.contracts.timeline import Moment, Timeline
from hydraserve.errors import HydraError, InstanceFailedError, StorageError, TemporaryError


class ScriptedBackend:
    """start() blocks until released by the test, then succeeds or fails as scripted."""

    can_prewarm = True

    def __init__(self, url: str = "http://127.0.0.1:9", auto_release: bool = True) -> None:
        self.url = url
        self.next_urls: list[str] = []  # each start answers at the next of these, then at ``url``
        self.starts = 0
        self.stops: list[str] = []
        self.fail_next: str | HydraError | None = None  # a reason (TemporaryError) or the error itself
        self.memory_gb = 2.0  # instance_memory_gb() of every instance
        self.model_version = "v1"  # model_fingerprint(): a test "pushes" by changing it
        self.lose_next: list[str] = []  # each start raises "worker lost on <node>" while this lasts
        self.excluded: list[tuple[str, ...]] = []  # exclude_nodes of each start
        self.failed: list[tuple[str, str]] = []  # (instance, reason) of each fail()
        self.lost: dict[str, list[str]] = {}  # instance -> nodes its workers were lost on
        self.replicas: dict[str, list[Endpoint]] = {}
        self.prewarmed: list[tuple[str, float]] = []  # (function, hold_s) of each prewarm()  # instance -> replicas it becomes (handed out once)
        self.prepared: list[str] = []  # names prepare() read (a model ending in /missing cannot be read)
        self.started_with: list[FunctionConfig] = []  # the config of each start
        self.running: dict[str, str] = {}  # instance -> function, until stopped or failed
        self.log_lines: list[str] = []  # what every instance's one worker wrote (worker_logs)
        self.release_start = threading.Event()
        if auto_release:
            self.release_start.set()
        self.started = threading.Event()

    def prepare(self, function: FunctionConfig) -> object:
        if function.model_uri.endswith("/missing"):
            raise StorageError(f"{function.model_uri}/config.json: NoSuchKey")
        self.prepared.append(function.name)
        return function

    def model_fingerprint(self, function: FunctionConfig) -> str:
        return f"{function.model_uri}@{self.model_version}"

    def start(self, function: FunctionConfig, timeline: Timeline, exclude_nodes: Sequence[str] = ()) -> Endpoint:
        self.starts += 1
        self.started_with.append(function)
        self.excluded.append(tuple(exclude_nodes))
        self.started.set()
        timeline.mark(Moment.PLAN_DECIDED, component="fake", nodes=["fake-node"], pipeline_size=1)
        timeline.progress(**{"fetch_bytes.0": 50e6, "fetched_bytes.0": 20e6, "workers": 1, "workers_ready": 0})
        self.release_start.wait(10)
        if self.lose_next:
            raise InstanceFailedError("worker lost", nodes=(self.lose_next.pop(0),))
        if self.fail_next is not None:
            failure, self.fail_next = self.fail_next, None
            raise TemporaryError(failure) if isinstance(failure, str) else failure
        url = self.next_urls.pop(0) if self.next_urls else self.url
        instance_id = f"{function.name}-{self.starts}"
        self.running[instance_id] = function.name
        return Endpoint(url=url, instance_id=instance_id)

    def stop(self, function_name: str, instance_id: str) -> None:
        self.stops.append(instance_id)
        self.running.pop(instance_id, None)

    def fail(self, function_name: str, instance_id: str, reason: str) -> tuple[str, ...]:
        self.failed.append((instance_id, reason))
        self.running.pop(instance_id, None)
        return tuple(self.lost.pop(instance_id, ()))

    def prewarm(self, function: FunctionConfig, hold_s: float) -> int:
        self.prewarmed.append((function.name, hold_s))
        return 0

    def take_replicas(self, instance_id: str) -> list[Endpoint]:
        return self.replicas.pop(instance_id, [])

    def instance_memory_gb(self, instance_id: str) -> float:
        return self.memory_gb

    def lost_nodes(self, instance_id: str) -> tuple[str, ...]:
        return tuple(self.lost.get(instance_id, ()))

    def worker_timeline(self, endpoint: Endpoint) -> Timeline:
        return Timeline()

    def worker_logs(self, function_name: str, tail: int) -> list[WorkerLog]:
        return [WorkerLog(instance, 0, "fake-node", "\n".join(self.log_lines[-tail:]))
                for instance, function in self.running.items() if function == function_name]
