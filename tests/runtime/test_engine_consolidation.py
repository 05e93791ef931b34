"""Pipeline consolidation: a stage grows into the whole model, the other stage's KV migrates,
and generation continues exactly as if the whole model had served from the start."""

from __future__ import annotations

from pathlib import Path

import pytest

from hydraserve.contracts.stage import StagePlan, StageSpec
from hydraserve.modeltools.tiny import TinySpec, make_tiny_model
from hydraserve.runtime.engine.engine import LLMEngine
from hydraserve.runtime.engine.factory import load_engine
from hydraserve.runtime.engine.runner import Executor, ModelRunner, PipelineExecutor, StageRunner
from hydraserve.runtime.engine.types import SamplingParams
from hydraserve.runtime.model.config import ModelConfig
from hydraserve.runtime.model.loader import grow_stage, load_stage
from hydraserve.runtime.tokenizer import Tokenizer
from hydraserve.weights.layout import stage_tensors
from hydraserve.weights.local import LocalTensorSource
from tests.sources import CountingSource

PROMPTS = ["The lighthouse keeper", "Hello! How are you today?", "One, two"]


@pytest.mark.parametrize("tied", [False, True])
def test_consolidate_pipeline_mid_generation(tmp_path: Path, tied: bool) -> None:
    model_dir = make_tiny_model(tmp_path / "m", TinySpec(layers=4, kv_heads=2, tie_embeddings=tied))
    cfg = ModelConfig.from_json((model_dir / "config.json").read_text())
    plan = StagePlan.from_boundaries(4, [0, 2, 4])
    r0, r1 = (StageRunner(load_stage(cfg, LocalTensorSource(model_dir), s), 4, 128) for s in plan.stages)
    tokenizer = Tokenizer.from_dir(str(model_dir))
    engine = LLMEngine(PipelineExecutor([r0, r1]), tokenizer, model_name="m", max_model_len=128,
                       vocab_size=cfg.vocab_size, max_num_seqs=4)
    params = SamplingParams(max_tokens=20, temperature=0.0)
    prompts = [tokenizer.encode(p) for p in PROMPTS]
    streams = [engine.submit(ids, params) for ids in prompts]
    for _ in range(6):
        engine.step()

    source = CountingSource(model_dir)
    migrated: dict[int, int] = {}

    def consolidate(old: Executor, cached: dict[int, int]) -> Executor:
        assert old.stages == [r0, r1]  # type: ignore[attr-defined]
        whole = ModelRunner(grow_stage(r0.model, source, StageSpec.whole(4)), 4, 128)
        for slot, length in cached.items():
            whole.kv.import_slot(slot, *r0.kv.export_slot(slot, length))
            whole.kv.import_slot(slot, *r1.kv.export_slot(slot, length), first_layer=2)
        migrated.update(cached)
        return whole

    engine.reconfigure(consolidate)
    assert sorted(migrated.values()) == sorted(len(p) + 5 for p in prompts)  # 6 tokens, 5 cached
    # only the retired stage's tensors were read; stage 0's are shared, not reloaded
    names = source.tensor_names()
    assert sorted(source.requested) == sorted(set(stage_tensors(names, plan.stages[1], cfg.architecture))
                                              - set(stage_tensors(names, plan.stages[0], cfg.architecture)))
    whole_model = engine.executor.model  # type: ignore[attr-defined]
    assert whole_model.layers["0"].attn.wq.weight.data_ptr() == r0.model.layers["0"].attn.wq.weight.data_ptr()

    engine.start()
    late = engine.submit(tokenizer.encode("Dear friend"), params)
    got = [s.collect().token_ids for s in [*streams, late]]
    engine.shutdown()
    reference = load_engine(model_dir, max_model_len=128)
    try:
        want = [reference.submit(ids, params).collect().token_ids
                for ids in [*prompts, tokenizer.encode("Dear friend")]]
    finally:
        reference.shutdown()
    assert got == want


def test_grow_stage_rejects_a_smaller_target(tmp_path: Path) -> None:
    model_dir = make_tiny_model(tmp_path / "m", TinySpec(layers=4))
    cfg = ModelConfig.from_json((model_dir / "config.json").read_text())
    stage = StagePlan.from_boundaries(4, [0, 2, 4]).stages[0]
    model = load_stage(cfg, LocalTensorSource(model_dir), stage)
    with pytest.raises(ValueError, match="do not contain"):
        grow_stage(model, LocalTensorSource(model_dir), StageSpec(index=0, num_stages=2, layer_start=0,
                                                                  layer_end=1, num_layers=4))
