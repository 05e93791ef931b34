"""A FunctionBackend whose instances are controllable in-process stand-ins.

For unit tests of the gateway's state machine only (buffering, failure, idle); the
end-to-end tests use the real local-process backend with real workers.
"""

from __future__ import annotations

import threading

from hydraserve.activator.functions import FunctionConfig
from hydraserve.activator.ports import Endpoint
from hydraserve.contracts.timeline import Timeline
from hydraserve.errors import TemporaryError


class ScriptedBackend:
    """start() blocks until released by the test, then succeeds or fails as scripted."""

    def __init__(self, url: str = "http://127.0.0.1:9", auto_release: bool = True) -> None:
        self.url = url
        self.starts = 0
        self.stops: list[str] = []
        self.fail_next: str | None = None
        self.release_start = threading.Event()
        if auto_release:
            self.release_start.set()
        self.started = threading.Event()

    def start(self, function: FunctionConfig, timeline: Timeline) -> Endpoint:
        self.starts += 1
        self.started.set()
        timeline.mark("plan_decided", component="fake")
        self.release_start.wait(10)
        if self.fail_next is not None:
            reason, self.fail_next = self.fail_next, None
            raise TemporaryError(reason)
        return Endpoint(url=self.url, instance_id=f"{function.name}-{self.starts}")

    def stop(self, function_name: str, instance_id: str) -> None:
        self.stops.append(instance_id)

    def worker_timeline(self, endpoint: Endpoint) -> Timeline:
        return Timeline()
