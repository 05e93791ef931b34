"""A pipeline group on vLLM's own pipeline parallelism: two workers adopted from a warm pool, the
head (stage 0, given memory for the whole model) and a stage (its layers only), joined over TCP on
loopback (namespaced nodes: tests/e2e). The group answers transformers' greedy tokens; the head
consolidates under a stream (a standalone engine starts beside the group's, the stream is
re-prefilled on it after the bound) and then answers alone, with the same tokens."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import torch

from hydraserve.contracts.stage import StagePlan
from hydraserve.processes import free_port

PROMPT_IDS = [1, 42, 338, 81, 265, 291, 325]


@pytest.fixture(scope="module")
def four_layers(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from hydraserve.modeltools.tiny import TinySpec, make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("group") / "m", TinySpec(arch="llama", layers=4, kv_heads=1))


@pytest.fixture(scope="module")
def greedy(four_layers: Path) -> Any:
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(str(four_layers), dtype=torch.float32).eval()

    def run(ids: list[int], n: int) -> list[int]:
        out = model.generate(torch.tensor([ids]), max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
        return out[0, len(ids):].tolist()

    return run


@pytest.fixture
def group(vllm_pool: Any, four_layers: Path) -> Iterator[list[Any]]:
    plan = StagePlan.from_boundaries(4, [0, 1, 4])  # uneven, as the planner's byte balance makes them
    ports = [free_port(), free_port()]
    peers = [f"127.0.0.1:{p}" for p in ports]
    workers = [vllm_pool.launch(str(four_layers), stage=plan.stages[i], transport_port=ports[i], peers=peers,
                                group_layers=[1, 3], full=(i == 0), handover_s=0.5) for i in range(2)]
    try:
        for w in workers:
            w.wait_ready(120)
        yield workers
    finally:
        for w in workers:
            w.stop(grace_s=5)


def complete(url: str, ids: list[int], n: int) -> list[int]:
    r = requests.post(url + "/v1/completions", json={"prompt": ids, "max_tokens": n, "temperature": 0,
                                                     "ignore_eos": True}, timeout=120)
    assert r.status_code == 200, r.text
    return list(r.json()["choices"][0]["token_ids"])


def test_a_group_serves_then_consolidates_under_a_stream_losing_nothing(group: list[Any], greedy: Any) -> None:
    head, stage = group
    assert complete(head.url, PROMPT_IDS, 8) == greedy(PROMPT_IDS, 8)
    events: list[str] = []

    def stream() -> None:
        with requests.post(head.url + "/v1/completions", json={"prompt": [1, 42], "max_tokens": 500, "temperature": 0,
                                                               "ignore_eos": True, "stream": True},
                           stream=True, timeout=120) as r:
            events.extend(line.decode() for line in r.iter_lines() if line)

    reader = threading.Thread(target=stream)
    reader.start()
    deadline = time.monotonic() + 90
    while not requests.get(head.url + "/readyz", timeout=5).json()["consolidated"]:
        assert time.monotonic() < deadline, "the head did not consolidate"
        time.sleep(0.1)
    reader.join(120)
    assert events[-1] == "data: [DONE]"
    streamed = [t for e in events[:-1] for t in json.loads(e[6:])["choices"][0].get("token_ids") or []]
    assert streamed == greedy([1, 42], 500)  # the move changed no token
    timeline = {e["name"]: e for e in requests.get(head.url + "/v1/hydraserve/timeline", timeout=5).json()["events"]}
    assert timeline["handover_done"]["detail"]["moved"] == 1  # it was re-prefilled on the standalone engine
    assert {"consolidation_fetched", "standalone_started", "consolidated"} <= timeline.keys()
    stage.stop(grace_s=5)  # the cold start retires a partial stage once its head consolidated
    assert complete(head.url, PROMPT_IDS, 8) == greedy(PROMPT_IDS, 8)  # the head alone
