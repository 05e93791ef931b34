"""The worker's environment contract, both ways: what a launcher writes is what the worker reads."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from hydraserve.contracts.stage import StageSpec
from hydraserve.contracts.worker import ENV_KEYS, WorkerEnvironment

FULL = WorkerEnvironment(
    port=9123, host="10.0.0.7", transport_port=9124, function="llama", revision="llama-00003", configuration="llama",
    instance_id="llama-1a2b", model_uri="s3://models/llama", s3_endpoint_url="http://s3:9000",
    s3_retry_budget_s=4.5, s3_fetch="download", stage=StageSpec(index=1, num_stages=2, layer_start=16, layer_end=32, num_layers=32),
    full=False, first_token_engine="vllm", peers=["10.0.0.6:9002", "10.0.0.7:9124"], loaderd_url="http://127.0.0.1:7070",
    loaderd_token="t" * 32, dtype="bfloat16", max_batch=4, max_model_len=2048, torch_threads=1,
    spawned_at=1700000000.25, drain_timeout_s=12.0)


def test_every_field_crosses_the_environment_and_comes_back_equal() -> None:
    env = FULL.to_env()
    assert set(ENV_KEYS) == set(WorkerEnvironment.model_fields)  # no field without its variable
    assert WorkerEnvironment.from_env(env) == FULL
    assert env["K_SERVICE"] == "llama" and env["PORT"] == "9123" and env["HYDRASERVE_FULL"] == "0"
    assert not FULL.is_head and WorkerEnvironment(model_uri="m").is_head


@pytest.mark.parametrize(("field", "value"), [("loaderd_token", "t" * 32)])
def test_the_token_is_a_secret_and_may_come_from_a_file(tmp_path: Path, field: str, value: str) -> None:
    assert value not in repr(FULL) and value not in str(FULL) and value not in FULL.model_dump_json()
    secret_file = tmp_path / field
    secret_file.write_text("f" * 32 + "\n")
    env = WorkerEnvironment.from_env({"HYDRASERVE_MODEL_URI": "s3://m/x",
                                      f"{ENV_KEYS[field]}_FILE": str(secret_file)})
    got = getattr(env, field)
    assert got is not None and got.get_secret_value() == "f" * 32


def test_knative_keys_and_defaults() -> None:
    env = WorkerEnvironment.from_env({"HYDRASERVE_MODEL_URI": "/models/x", "K_SERVICE": "fn", "K_REVISION": "fn-1",
                                      "AWS_ENDPOINT_URL": "http://minio:9000"})
    assert env.function == "fn" and env.revision == "fn-1" and env.s3_endpoint_url == "http://minio:9000"
    # under Knative too the worker listens on loopback: queue-proxy dials 127.0.0.1:$PORT
    assert env.host == "127.0.0.1" and env.port == 8080 and env.stage is None and env.full


@pytest.mark.parametrize(("key", "value", "field"), [
    ("PORT", "http", "port"), ("HYDRASERVE_MAX_BATCH", "0", "max_batch"),
    ("HYDRASERVE_STAGE", '{"index": 3, "num_stages": 2, "layer_start": 0, "layer_end": 1, "num_layers": 2}', "stage"),
    ("HYDRASERVE_PEERS", '"not a list"', "peers"), ("HYDRASERVE_S3_RETRY_BUDGET_S", "-1", "s3_retry_budget_s"),
    ("HYDRASERVE_S3_FETCH", "carrier-pigeon", "s3_fetch"),
])
def test_a_bad_value_is_refused_naming_its_field(key: str, value: str, field: str) -> None:
    with pytest.raises((ValidationError, ValueError), match=field if field != "stage" else "stage index"):
        WorkerEnvironment.from_env({"HYDRASERVE_MODEL_URI": "m", key: value})


def test_a_stage_of_a_group_needs_its_links() -> None:
    stage = StageSpec(index=0, num_stages=2, layer_start=0, layer_end=1, num_layers=2)
    with pytest.raises(ValidationError, match="needs transport_port and one peer address per stage"):
        WorkerEnvironment(model_uri="m", stage=stage, transport_port=9000, peers=["a:1"])


def test_no_model_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="HYDRASERVE_MODEL_URI is not set"):
        WorkerEnvironment.from_env({"K_SERVICE": "fn"})


def test_serve_name_sets_the_function_not_the_bind_address(monkeypatch: pytest.MonkeyPatch) -> None:
    """`hydraserve serve --name` used to set K_SERVICE, which also moved the listener to 0.0.0.0."""
    import argparse

    from hydraserve.cli import serve

    seen: list[WorkerEnvironment] = []
    monkeypatch.setattr("hydraserve.runtime.worker.run", lambda settings: seen.append(settings) or 0)
    monkeypatch.setattr("hydraserve.logs.configure_logging", lambda *a, **k: None)
    monkeypatch.delenv("HYDRASERVE_HOST", raising=False)
    parser = argparse.ArgumentParser()
    serve.configure(parser)
    args = parser.parse_args(["--model", "/models/x", "--name", "my-fn"])
    assert args.func(args) == 0
    assert seen[0].function == "my-fn" and seen[0].host == "127.0.0.1"


def test_nothing_the_launchers_own_environment_holds_leaks_into_the_worker() -> None:
    stale = {**FULL.to_env(), "HYDRASERVE_LOADERD_TOKEN_FILE": "/no/such/file"}  # e.g. the parent's shell
    mine = WorkerEnvironment(model_uri="/models/x")
    assert WorkerEnvironment.from_env({**stale, **mine.to_env()}) == mine
