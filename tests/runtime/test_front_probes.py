"""The worker front's probes (runtime/serving/front.py), in-process: liveness answers whenever
the serving loop does, failed or not; health and readiness say whether it can serve."""

from __future__ import annotations

from starlette.testclient import TestClient

from hydraserve.contracts.worker import WorkerStatus
from hydraserve.errors import UnsupportedModelError
from hydraserve.runtime.serving.front import Front
from hydraserve.runtime.serving.state import ServingState


def test_a_failed_worker_is_alive_but_neither_healthy_nor_ready() -> None:
    state: ServingState[object] = ServingState("fn", "fn-00001")
    with TestClient(Front(state)) as client:
        assert [client.get(p).status_code for p in ("/livez", "/healthz", "/readyz")] == [200, 200, 503]  # starting
        state.set_failed("UnsupportedModelError: no tokenizer", UnsupportedModelError("no tokenizer"))
        assert [client.get(p).status_code for p in ("/livez", "/healthz", "/readyz")] == [200, 500, 503]
        failed = WorkerStatus.model_validate(client.get("/healthz").json())
        assert failed.status == "failed" and failed.error_type == "unsupported_model_error"
        assert client.post("/livez").status_code == 404  # a probe, not a function route
