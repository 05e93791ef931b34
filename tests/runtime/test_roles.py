"""Worker roles: the head wires tokenizer, engine and the API; an inner stage holds its layers
and their KV cache, reads no tokenizer and serves no API (its stage link serves the ring).
Load my stage, then wire my role."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest
import torch

from hydraserve.contracts.stage import StagePlan
from hydraserve.contracts.tensors import TensorEntry
from hydraserve.contracts.timeline import Timeline
from hydraserve.contracts.worker import WorkerEnvironment
from hydraserve.runtime.engine.engine import LLMEngine
from hydraserve.runtime.engine.factory import load_engine
from hydraserve.runtime.engine.runner import StageRunner, StepInput
from hydraserve.runtime.engine.types import SamplingParams
from hydraserve.runtime.roles import HeadRole, InnerStageRole, role_for
from hydraserve.runtime.server.app import create_app
from hydraserve.runtime.server.state import RuntimeState
from hydraserve.runtime.startup import load_my_stage
from hydraserve.runtime.transport.link import listen
from hydraserve.weights.model_files import LocalModelFiles, ModelFiles
from hydraserve.weights.source import TensorSource


class SpyFiles(ModelFiles):
    """A local model that remembers which small files were read."""

    def __init__(self, root: Path) -> None:
        self._local = LocalModelFiles(root)
        self.uri = self._local.uri
        self.read: list[str] = []

    def read_bytes(self, name: str) -> bytes:
        self.read.append(name)
        return self._local.read_bytes(name)

    def tensor_index(self) -> dict[str, TensorEntry]:
        return self._local.tensor_index()

    def tensor_source(self, names: Sequence[str]) -> TensorSource:
        return self._local.tensor_source(names)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from hydraserve.modeltools.tiny import TinySpec, make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("roles") / "m", TinySpec(arch="llama", layers=4, kv_heads=2))


def test_the_head_of_a_whole_model_serves_like_the_engine_factory(model_dir: Path) -> None:
    settings = WorkerEnvironment(model_uri=str(model_dir), function="tiny", max_batch=2)
    role = role_for(settings)
    assert isinstance(role, HeadRole)
    files, timeline = SpyFiles(model_dir), Timeline()
    loaded = load_my_stage(settings, files, timeline, role.prepare)
    assert "tokenizer.json" in files.read
    engine = role.wire(loaded, timeline)
    try:
        assert isinstance(engine, LLMEngine) and engine.model_name == "tiny"
        assert [e.name for e in timeline.events] == ["config_loaded", "weights_attached", "first_tensor_loaded",
                                                     "weights_loaded", "warmed_up"]
        reference = load_engine(model_dir)
        try:
            ids = engine.tokenizer.encode("Hello there")
            params = SamplingParams(max_tokens=8, temperature=0.0)
            assert engine.submit(ids, params).collect().token_ids == reference.submit(ids, params).collect().token_ids
        finally:
            reference.shutdown()
    finally:
        engine.shutdown()


GROUP = {"peers": ["127.0.0.1:1", "127.0.0.1:2"], "transport_port": 1, "link_secret": "s" * 32}


def test_a_head_over_part_of_the_model_links_its_group_or_says_why(model_dir: Path) -> None:
    stage = StagePlan.from_boundaries(4, [0, 2, 4]).stages[0]
    settings = WorkerEnvironment(model_uri=str(model_dir), stage=stage, **GROUP)  # type: ignore[arg-type]
    role = role_for(settings)
    assert isinstance(role, HeadRole)
    loaded = load_my_stage(settings, LocalModelFiles(model_dir), Timeline(), role.prepare)
    with pytest.raises(ValueError, match="needs its stage-link listener"):
        role.wire(loaded, Timeline())  # (a linked group: test_transport.py, test_worker_process.py)


def test_an_inner_stage_loads_its_layers_and_a_kv_cache_but_no_tokenizer(model_dir: Path) -> None:
    plan = StagePlan.from_boundaries(4, [0, 2, 4])
    settings = WorkerEnvironment(model_uri=str(model_dir), stage=plan.stages[1], full=False, max_batch=3,
                                 **GROUP)  # type: ignore[arg-type]
    listener = listen("127.0.0.1:0")
    role = role_for(settings, listener)
    assert isinstance(role, InnerStageRole) and not settings.is_head
    files, timeline = SpyFiles(model_dir), Timeline()
    loaded = load_my_stage(settings, files, timeline, role.prepare)
    link = role.wire(loaded, timeline)
    link.close()
    runner = link.runner
    assert files.read == ["config.json"]  # no tokenizer, no generation config
    assert isinstance(runner, StageRunner) and set(runner.model.layers) == {"2", "3"}
    assert runner.kv.num_slots == 3 and timeline.first("kv_cache_allocated") is not None
    # it computes its share of a step from the previous stage's hidden states
    hidden = torch.randn(1, 5, loaded.config.hidden_size)
    step = StepInput(prefill_tokens=[[1, 2, 3, 4, 5]], prefill_slots=[0])
    (logits,) = runner.run(step, [hidden])
    assert logits.shape == (1, loaded.config.vocab_size)


def test_an_inner_stage_serves_health_but_no_api(model_dir: Path) -> None:
    state = RuntimeState("tiny")
    app = create_app(state, api=False).test_client()
    assert app.get("/healthz").status_code == 200 and app.get("/readyz").status_code == 503
    state.set_stage(object())
    assert app.get("/readyz").status_code == 200
    assert app.post("/v1/completions", json={"prompt": "x"}).status_code == 404
    assert app.get("/v1/models").status_code == 404 and app.post("/", data=b"{}").status_code in (404, 405)
    head = create_app(RuntimeState("tiny"), ready_wait_s=0.05).test_client()
    assert head.get("/v1/models").status_code == 503  # the head's API exists (and waits for the engine)
