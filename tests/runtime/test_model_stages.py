"""Stage slicing and loading: stages chained equal the whole model, each stage reads only its
own tensors, tensors are used without copies, sharded and bf16 checkpoints load."""

from __future__ import annotations

import json
import mmap
import warnings
from pathlib import Path

import pytest
import torch

from hydraserve.contracts.stage import StagePlan, StageSpec
from hydraserve.modeltools.tiny import TinySpec, make_tiny_model
from hydraserve.runtime.engine.kv_cache import KVCache
from hydraserve.runtime.model.config import ModelConfig, UnsupportedModelError
from hydraserve.runtime.model.loader import WeightMismatchError, load_stage
from hydraserve.weights.layout import stage_tensors
from hydraserve.weights.local import LocalTensorSource


class RecordingSource:
    """A real TensorSource (in-memory, read-only tensors) that records what was asked for."""

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        self.tensors = tensors
        self.requested: list[str] = []

    def tensor_names(self) -> list[str]:
        return list(self.tensors)

    def get(self, name: str) -> torch.Tensor:
        self.requested.append(name)
        return self.tensors[name]

    def close(self) -> None:
        pass


def _read_only_tensors(model_dir: Path, tmp_path: Path) -> dict[str, torch.Tensor]:
    """Every tensor as a view into one read-only mmap, the way loaderd readers map shared memory."""
    source = LocalTensorSource(model_dir)
    blob, spans = bytearray(), {}
    for name in source.tensor_names():
        t = source.get(name).contiguous()
        spans[name] = (len(blob), t.dtype, t.shape, t.numel())
        blob += t.view(torch.uint8).numpy().tobytes()
        blob += bytes(-len(blob) % 8)
    path = tmp_path / "segment.bin"
    path.write_bytes(bytes(blob))
    with open(path, "rb") as f:
        mapping = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
    assert memoryview(mapping).readonly
    out = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "The given buffer is not writable"
        for name, (offset, dtype, shape, count) in spans.items():
            out[name] = torch.frombuffer(mapping, dtype=dtype, count=count, offset=offset).view(shape)
    return out


@pytest.fixture(scope="module")
def four_layer_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("stages")
    return {
        "llama": make_tiny_model(root / "llama", TinySpec(arch="llama", layers=4, kv_heads=2)),
        "llama_tied": make_tiny_model(root / "tied", TinySpec(arch="llama", layers=4, tie_embeddings=True)),
        "opt": make_tiny_model(root / "opt", TinySpec(arch="opt", layers=4, word_embed_proj_dim=32)),
    }


def _config(model_dir: Path) -> ModelConfig:
    return ModelConfig.from_json((model_dir / "config.json").read_text())


@pytest.mark.parametrize("name", ["llama", "llama_tied", "opt"])
def test_two_and_three_stages_equal_whole_model(four_layer_dirs: dict[str, Path], name: str) -> None:
    model_dir = four_layer_dirs[name]
    cfg = _config(model_dir)
    whole = load_stage(cfg, LocalTensorSource(model_dir))
    ids = torch.tensor([[1, 40, 200, 77, 300, 12, 9, 150]])
    positions = torch.arange(ids.shape[1])[None]
    expected = whole(ids, positions, all_logits=True)
    for boundaries in ([0, 2, 4], [0, 1, 3, 4]):
        plan = StagePlan.from_boundaries(cfg.num_layers, boundaries)
        stages = [load_stage(cfg, LocalTensorSource(model_dir), spec) for spec in plan.stages]
        h = ids
        for stage in stages[:-1]:
            h = stage(h, positions)
            assert h.shape == (1, ids.shape[1], cfg.hidden_size)
        torch.testing.assert_close(stages[-1](h, positions, all_logits=True), expected, atol=1e-6, rtol=1e-6)


def test_stages_with_kv_caches_decode_like_whole_model(four_layer_dirs: dict[str, Path]) -> None:
    """Prefill then 5 decode steps through two stages, each with its own KV cache."""
    model_dir = four_layer_dirs["llama"]
    cfg = _config(model_dir)
    plan = StagePlan.from_boundaries(cfg.num_layers, [0, 3, 4])
    stages = [load_stage(cfg, LocalTensorSource(model_dir), spec) for spec in plan.stages]
    caches = [KVCache.for_stage(cfg, s.stage, num_slots=2, max_len=32, dtype=torch.float32) for s in stages]
    whole = load_stage(cfg, LocalTensorSource(model_dir))
    tokens = [1, 40, 200, 77]
    slot = torch.tensor([1])
    h = stages[0](torch.tensor([tokens]), torch.arange(4)[None], slot, caches[0])
    logits = stages[1](h, torch.arange(4)[None], slot, caches[1])
    for _ in range(5):
        tokens.append(int(logits.argmax()))
        pos = torch.tensor([[len(tokens) - 1]])
        h = stages[0](torch.tensor([[tokens[-1]]]), pos, slot, caches[0])
        logits = stages[1](h, pos, slot, caches[1])
        reference = whole(torch.tensor([tokens]), torch.arange(len(tokens))[None])
        torch.testing.assert_close(logits, reference, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["llama", "llama_tied", "opt"])
def test_each_stage_requests_only_its_own_tensors(four_layer_dirs: dict[str, Path], name: str) -> None:
    model_dir = four_layer_dirs[name]
    cfg = _config(model_dir)
    local = LocalTensorSource(model_dir)
    tensors = {n: local.get(n) for n in local.tensor_names()}
    plan = StagePlan.from_boundaries(cfg.num_layers, [0, 1, 3, 4])
    seen: set[str] = set()
    for spec in plan.stages:
        source = RecordingSource(tensors)
        load_stage(cfg, source, spec)
        assert sorted(source.requested) == sorted(stage_tensors(tensors, spec, cfg.architecture))
        assert len(source.requested) == len(set(source.requested))  # tied weights fetched once
        layers = {int(n.split("layers.")[1].split(".")[0]) for n in source.requested if "layers." in n}
        assert layers == set(range(spec.layer_start, spec.layer_end))
        embed_read = any("embed_tokens" in n for n in source.requested)
        tied_head = cfg.tie_word_embeddings and spec.is_last
        assert embed_read == (spec.is_first or tied_head)
        seen |= set(source.requested)
    assert seen == set(tensors)  # together the stages read the whole checkpoint


def test_tensors_are_assigned_without_copy_even_read_only(four_layer_dirs: dict[str, Path],
                                                          tmp_path: Path) -> None:
    model_dir = four_layer_dirs["llama"]
    cfg = _config(model_dir)
    tensors = _read_only_tensors(model_dir, tmp_path)
    model = load_stage(cfg, RecordingSource(tensors), StageSpec(index=0, num_stages=2, layer_start=0,
                                                                layer_end=2, num_layers=4))
    q = model.layers["1"].attn.wq.weight
    assert q.data_ptr() == tensors["model.layers.1.self_attn.q_proj.weight"].data_ptr()
    assert model.embed.weight.data_ptr() == tensors["model.embed_tokens.weight"].data_ptr()
    h = model(torch.tensor([[1, 2, 3]]), torch.arange(3)[None])
    assert torch.isfinite(h).all()


def test_requested_dtype_converts_and_order_is_layer_by_layer(four_layer_dirs: dict[str, Path]) -> None:
    model_dir = four_layer_dirs["opt"]
    cfg = _config(model_dir)
    order: list[str] = []
    model = load_stage(cfg, LocalTensorSource(model_dir), dtype="bfloat16",
                       on_tensor=lambda name, waited: order.append(name))
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    layer_of = [int(n.split("layers.")[1].split(".")[0]) for n in order if "layers." in n]
    assert layer_of == sorted(layer_of)
    assert "embed" in order[0] and order.index("model.decoder.project_out.weight") > order.index(
        "model.decoder.layers.3.fc2.weight")


def test_sharded_checkpoint_loads_same_as_single_file(tmp_path: Path) -> None:
    single = make_tiny_model(tmp_path / "single", TinySpec(arch="llama", kv_heads=2))
    sharded = make_tiny_model(tmp_path / "sharded", TinySpec(arch="llama", kv_heads=2, shard_size="100KB"))
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    cfg = _config(single)
    ids, pos = torch.tensor([[1, 5, 9]]), torch.arange(3)[None]
    a = load_stage(cfg, LocalTensorSource(single))(ids, pos)
    b = load_stage(cfg, LocalTensorSource(sharded))(ids, pos)
    torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_unsupported_architecture_and_bad_shapes_are_clear_errors(four_layer_dirs: dict[str, Path]) -> None:
    hf = json.loads((four_layer_dirs["llama"] / "config.json").read_text())
    with pytest.raises(UnsupportedModelError, match="gpt_neox"):
        ModelConfig.from_hf({**hf, "model_type": "gpt_neox"})
    with pytest.raises(UnsupportedModelError, match="rope type"):
        ModelConfig.from_hf({**hf, "rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4}})
    wrong = ModelConfig.from_hf({**hf, "intermediate_size": 96})
    with pytest.raises(WeightMismatchError, match=r"layers\.0\.mlp\.(gate|up|down)\.weight: checkpoint shape"):
        load_stage(wrong, LocalTensorSource(four_layer_dirs["llama"]))


def test_config_parses_transformers_4_spelling(four_layer_dirs: dict[str, Path]) -> None:
    hf = json.loads((four_layer_dirs["llama"] / "config.json").read_text())
    hf.pop("rope_parameters")
    hf.update(rope_theta=500000.0, torch_dtype="bfloat16", rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192})
    cfg = ModelConfig.from_hf(hf)
    assert cfg.rope_theta == 500000.0 and cfg.dtype == "bfloat16"
    assert cfg.rope_scaling is not None and cfg.rope_scaling["rope_type"] == "llama3"
    assert cfg.head_dim == 32 and cfg.num_kv_heads == 2


def test_mistral_sliding_window_caps_the_context(four_layer_dirs: dict[str, Path]) -> None:
    hf = json.loads((four_layer_dirs["llama"] / "config.json").read_text())
    cfg = ModelConfig.from_hf({**hf, "model_type": "mistral", "sliding_window": 128})
    assert cfg.family == "llama" and cfg.max_position_embeddings == 128
    assert ModelConfig.from_hf({**hf, "model_type": "mistral", "sliding_window": None}).max_position_embeddings == 512
