"""Faults of a pipeline group on the embedded stack (real worker processes, loaderds, S3 and
placement over HTTP), checked with the openai client and against transformers' tokens: a stage
killed while the group streams ends that stream with an error the client raises, and the group
is failed and torn down; a stage killed during the cold start costs the waiting request a new
plan without that node, not an error. Nothing is left: no worker process, no placement memory,
no shared memory segment."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from hydraserve.embedded.stack import LocalStack, StackOptions
from hydraserve.provider.embedded.process import WorkerProcess
from tests.conditions import wait_for
from tests.e2e.test_cold_start import PROMPT, transformers_greedy


@pytest.fixture
def group_model(group_llama_dir: Path) -> Path:
    return group_llama_dir


@pytest.fixture
def stack(group_model: Path) -> Iterator[LocalStack]:  # a fresh one: what the last held would change the plan
    options = StackOptions(nodes=2, model_dir=group_model, node_nic_gbps=0.05, ttft_slo_s=3.0, idle_timeout_s=30.0,
                           progress=False, function_name="grouped", function={"consolidate": False})
    with LocalStack(options) as s:
        yield s
    assert s.leftovers == [], "shared memory segments left behind"
    assert s.backend.launcher.running() == [], "worker processes left behind"
    assert vllm_processes() == [], "vLLM processes left behind"


def vllm_processes() -> list[str]:
    """vLLM's engine and worker processes anywhere on the machine (they name themselves VLLM::)."""
    import psutil

    deadline = time.monotonic() + 5  # a stopped worker's children go within a moment
    while True:
        left = [f"{p.pid} {p.name()}" for p in psutil.process_iter(["name"]) if p.name().startswith("VLLM::")]
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.1)


def client(stack: LocalStack) -> openai.OpenAI:
    return openai.OpenAI(base_url=stack.function_url() + "/v1", api_key="unused", max_retries=0, timeout=120)


def inner_stages(stack: LocalStack) -> list[WorkerProcess]:
    return [w for w in stack.backend.launcher.running() if w.label.endswith("-1")]


def test_a_stage_killed_mid_stream_ends_the_stream_with_an_error_and_the_group_is_torn_down(
        stack: LocalStack, group_model: Path) -> None:
    assert stack.gateway is not None
    scaler = stack.gateway.scaler("grouped")
    received: list[str] = []
    lost_node = ""
    with pytest.raises(openai.APIError) as broken:
        stream = client(stack).completions.create(model="grouped", prompt=PROMPT, max_tokens=400, temperature=0,
                                                  stream=True, extra_body={"ignore_eos": True})
        for chunk in stream:
            received.append(chunk.choices[0].text)
            if len(received) == 3:
                (inner,) = inner_stages(stack)
                lost_node = inner.node
                os.kill(inner.proc.pid, signal.SIGKILL)
    assert 3 <= len(received) < 400
    # the head's engine dies with its stage: the gateway ends the stream with an error event
    assert "broke off the response" in broken.value.message, broken.value.message
    assert wait_for(lambda: scaler.status()["instance_failures"] == 1 and scaler.state.value == "zero", 30)
    assert stack.backend.launcher.running() == []  # the head was stopped too
    assert stack.placement.cluster().active_plans == 0  # its memory is free
    # the next request: a fresh instance on the node that lost nothing, transformers' tokens
    answer = client(stack).completions.create(model="grouped", prompt=PROMPT, max_tokens=8, temperature=0)
    token_ids = answer.choices[0].model_extra["token_ids"]  # type: ignore[index]
    assert token_ids == transformers_greedy(group_model, PROMPT, 8)[:len(token_ids)]
    plan = stack.gateway.cold_start_timeline("grouped").first("plan_decided")
    assert plan is not None and lost_node not in plan.detail["nodes"] and scaler.cold_starts == 2


def test_a_stage_killed_during_the_cold_start_costs_a_new_plan_not_an_error(stack: LocalStack,
                                                                            group_model: Path) -> None:
    assert stack.gateway is not None
    killed: list[str] = []

    def kill_the_inner_stage_once_it_exists() -> None:
        if wait_for(lambda: bool(inner_stages(stack)), 60):
            (inner,) = inner_stages(stack)
            killed.append(inner.node)
            os.kill(inner.proc.pid, signal.SIGKILL)

    killer = threading.Thread(target=kill_the_inner_stage_once_it_exists)
    killer.start()
    answer = client(stack).completions.create(model="grouped", prompt=PROMPT, max_tokens=8, temperature=0)
    killer.join(60)
    assert killed, "the group never started its inner stage"
    token_ids = answer.choices[0].model_extra["token_ids"]  # type: ignore[index]
    assert token_ids == transformers_greedy(group_model, PROMPT, 8)[:len(token_ids)]
    timeline = stack.gateway.cold_start_timeline("grouped")
    names = [e.name for e in timeline.events]
    assert "cold_start_failed" in names and "cold_start_retry" in names
    plans = [e for e in timeline.events if e.name == "plan_decided"]
    assert len(plans) == 2 and plans[0].detail["pipeline_size"] == 2
    assert killed[0] not in plans[1].detail["nodes"]
    assert stack.placement.cluster().active_plans == 1  # the failed plan's memory was freed
    assert len(stack.backend.launcher.running()) == plans[1].detail["pipeline_size"]
