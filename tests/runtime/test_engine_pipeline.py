"""The engine over a pipeline of stage runners gives exactly the whole model's tokens."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from hydraserve.contracts.stage import StagePlan
from hydraserve.modeltools.tiny import TinySpec, make_tiny_model
from hydraserve.runtime.engine.engine import LLMEngine
from hydraserve.runtime.engine.factory import load_engine
from hydraserve.runtime.engine.runner import PipelineExecutor, StageRunner, StepInput
from hydraserve.runtime.engine.types import SamplingParams
from hydraserve.runtime.model.config import ModelConfig
from hydraserve.runtime.model.loader import load_stage
from hydraserve.runtime.tokenizer import Tokenizer
from hydraserve.weights.local import LocalTensorSource

PROMPTS = ["The lighthouse", "Dear friend, I hope this letter finds you well.", "One", "Hello! How are you"]


@pytest.mark.parametrize("arch,boundaries", [("llama", [0, 1, 3, 4]), ("opt", [0, 2, 4])])
def test_pipelined_engine_matches_whole_model(tmp_path: Path, arch: str, boundaries: list[int]) -> None:
    model_dir = make_tiny_model(tmp_path / arch, TinySpec(arch=arch, layers=4, kv_heads=2 if arch == "llama" else None))  # type: ignore[arg-type]
    cfg = ModelConfig.from_json((model_dir / "config.json").read_text())
    plan = StagePlan.from_boundaries(cfg.num_layers, boundaries)
    runners = [StageRunner(load_stage(cfg, LocalTensorSource(model_dir), spec), 4, 128) for spec in plan.stages]
    assert [r.kv.k.shape[0] for r in runners] == [b - a for a, b in itertools.pairwise(boundaries)]
    tokenizer = Tokenizer.from_dir(str(model_dir))
    pipelined = LLMEngine(PipelineExecutor(runners), tokenizer, model_name="p", max_model_len=128,
                          vocab_size=cfg.vocab_size, max_num_seqs=4).start()
    whole = load_engine(model_dir, max_num_seqs=4, max_model_len=128)
    try:
        params = SamplingParams(max_tokens=16, temperature=0.0)
        ids = [tokenizer.encode(p) for p in PROMPTS]
        got = [s.collect().token_ids for s in [pipelined.submit(i, params) for i in ids]]
        want = [s.collect().token_ids for s in [whole.submit(i, params) for i in ids]]
        assert got == want
    finally:
        pipelined.shutdown()
        whole.shutdown()


def test_inner_stage_refuses_token_ids(tmp_path: Path) -> None:
    model_dir = make_tiny_model(tmp_path / "m", TinySpec(layers=2))
    cfg = ModelConfig.from_json((model_dir / "config.json").read_text())
    second = StagePlan.from_boundaries(2, [0, 1, 2]).stages[1]
    runner = StageRunner(load_stage(cfg, LocalTensorSource(model_dir), second), 1, 16)
    with pytest.raises(ValueError, match="hidden states"):
        runner.run(StepInput(prefill_tokens=[[1, 2]], prefill_slots=[0]), None)
