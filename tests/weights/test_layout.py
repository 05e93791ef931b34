"""Tensor roles, the stage slicer for llama and OPT (tied embeddings), byte profiles, balanced
stage plans. (Slicer coverage of every architecture, with loaderd and the runtime: tests/e2e.)"""

from __future__ import annotations

import random
import re
from pathlib import Path

import pytest

from hydraserve.contracts.stage import StagePlan, StageSpec
from hydraserve.errors import UnsupportedModelError
from hydraserve.weights.architectures import Architecture, Part, TensorRole
from hydraserve.weights.layout import (
    balanced_stage_plan,
    head_is_embedding,
    num_layers_in,
    segment_group,
    stage_byte_profile,
    stage_parameters,
    stage_tensors,
)

from .checkpoints import llama_tensors, opt_tensors

LLAMA = Architecture.from_config({"model_type": "llama"})
LLAMA_TIED = Architecture.from_config({"model_type": "llama", "tie_word_embeddings": True})
OPT = Architecture.from_config({"model_type": "opt"})  # OPT ties by default


def _stages(num_layers: int, boundaries: list[int]) -> list[StageSpec]:
    return StagePlan.from_boundaries(num_layers, boundaries).stages


@pytest.mark.parametrize(("arch", "name", "part", "layer", "param"), [
    (LLAMA, "model.embed_tokens.weight", Part.EMBEDDING, None, "embed.weight"),
    (LLAMA, "model.layers.0.self_attn.q_proj.weight", Part.LAYER, 0, "layers.0.attn.wq.weight"),
    (LLAMA, "model.layers.31.mlp.down_proj.weight", Part.LAYER, 31, "layers.31.mlp.down.weight"),
    (LLAMA, "model.layers.2.self_attn.rotary_emb.inv_freq", Part.UNUSED, 2, ""),
    (LLAMA, "model.norm.weight", Part.LAST, None, "norm.weight"),
    (LLAMA, "lm_head.weight", Part.HEAD, None, "head.weight"),
    (LLAMA_TIED, "lm_head.weight", Part.UNUSED, None, ""),  # a tied head is the embedding
    (OPT, "model.decoder.embed_tokens.weight", Part.EMBEDDING, None, "embed.weight"),
    (OPT, "model.decoder.embed_positions.weight", Part.FIRST, None, "pos_embed.weight"),
    (OPT, "model.decoder.project_in.weight", Part.FIRST, None, "project_in.weight"),
    (OPT, "model.decoder.layers.11.fc1.bias", Part.LAYER, 11, "layers.11.fc1.bias"),
    (OPT, "model.decoder.layers.1.final_layer_norm.weight", Part.LAYER, 1, "layers.1.mlp_norm.weight"),
    (OPT, "model.decoder.final_layer_norm.bias", Part.LAST, None, "final_norm.bias"),
    (OPT, "model.decoder.project_out.weight", Part.LAST, None, "project_out.weight"),
    (OPT, "decoder.layers.0.fc2.weight", Part.LAYER, 0, "layers.0.fc2.weight"),  # old checkpoints: no "model."
])
def test_roles(arch: Architecture, name: str, part: Part, layer: int | None, param: str) -> None:
    role = arch.role(name)
    assert (role.part, role.layer, role.param) == (part, layer, param)


@pytest.mark.parametrize(("arch", "name"), [
    (LLAMA, "model.rotary_emb.inv_freq"), (LLAMA, "model.layersX.1.w"), (LLAMA, "model.normalizer.weight"),
    (LLAMA, "model.layers.0.w"), (LLAMA, "model.decoder.layers.0.fc1.weight"), (OPT, "model.layers.0.mlp.up_proj.weight"),
])
def test_an_unknown_tensor_is_refused_naming_it_and_the_architecture(arch: Architecture, name: str) -> None:
    named = rf"{re.escape(repr(name))}.* {arch.family.name} architecture \(model_type {re.escape(repr(arch.model_type))}"
    with pytest.raises(UnsupportedModelError, match=named):
        arch.role(name)
    known = f"{arch.family.root}embed_tokens.weight"
    with pytest.raises(UnsupportedModelError, match=named):
        stage_tensors([known, name], StageSpec.whole(1), arch)


def test_other_architectures_follow_hugging_face_naming_and_unknown_tensors_are_refused() -> None:
    neox = Architecture.from_config({"model_type": "gpt_neox"})
    assert neox.role("gpt_neox.layers.3.attention.dense.weight") == TensorRole(Part.LAYER, 3)
    assert neox.role("gpt_neox.embed_in.weight").part is Part.EMBEDDING
    assert neox.role("embed_out.weight").part is Part.HEAD
    assert neox.role("gpt_neox.final_layer_norm.bias").part is Part.LAST
    gpt2 = Architecture.from_config({"model_type": "gpt2", "tie_word_embeddings": True})
    assert gpt2.role("transformer.wpe.weight").part is Part.FIRST
    assert gpt2.role("transformer.h.11.attn.c_attn.weight") == TensorRole(Part.LAYER, 11)
    assert gpt2.role("lm_head.weight").part is Part.UNUSED  # tied: the embedding is the head
    with pytest.raises(UnsupportedModelError, match="vision_tower"):
        neox.role("vision_tower.patch_embed.proj.weight")


def test_llama_stages_partition_the_checkpoint() -> None:
    names = list(llama_tensors(layers=6))
    stages = _stages(6, [0, 2, 5, 6])
    slices = [stage_tensors(names, s, LLAMA) for s in stages]

    assert sorted(n for s in slices for n in s) == sorted(names)  # each tensor exactly once
    assert "model.embed_tokens.weight" in slices[0]
    assert {"model.norm.weight", "lm_head.weight"} <= set(slices[2])
    assert {LLAMA.role(n).layer for n in slices[1]} == {2, 3, 4}
    assert {LLAMA.role(n).layer for n in slices[2] if LLAMA.role(n).layer is not None} == {5}


def test_tied_llama_last_stage_also_gets_the_embedding() -> None:
    names = list(llama_tensors(layers=4, tie=True))
    first, last = _stages(4, [0, 2, 4])
    assert "model.embed_tokens.weight" in stage_tensors(names, last, LLAMA_TIED)
    assert "model.embed_tokens.weight" in stage_tensors(names, first, LLAMA_TIED)
    assert "model.norm.weight" not in stage_tensors(names, first, LLAMA_TIED)
    assert stage_parameters(names, last, LLAMA_TIED)["model.embed_tokens.weight"] == ("head.weight",)
    whole = stage_parameters(names, StageSpec.whole(4), LLAMA_TIED)
    assert whole["model.embed_tokens.weight"] == ("embed.weight", "head.weight")  # read once, used twice


def test_opt_stages_with_projections_and_no_lm_head() -> None:
    names = list(opt_tensors(layers=4, project=True))
    first, middle, last = _stages(4, [0, 1, 3, 4])
    s0 = set(stage_tensors(names, first, OPT))
    s1 = set(stage_tensors(names, middle, OPT))
    s2 = set(stage_tensors(names, last, OPT))
    assert {"model.decoder.embed_tokens.weight", "model.decoder.embed_positions.weight",
            "model.decoder.project_in.weight"} <= s0
    assert not any("embed" in n or "project" in n for n in s1)
    assert {"model.decoder.project_out.weight", "model.decoder.final_layer_norm.weight",
            "model.decoder.embed_tokens.weight"} <= s2  # tied head = the embedding
    assert "model.decoder.embed_positions.weight" not in s2
    # no lm_head in the file means the head is the embedding, even if the flag says untied
    untied = Architecture.from_config({"model_type": "opt", "tie_word_embeddings": False})
    assert "model.decoder.embed_tokens.weight" in stage_tensors(names, last, untied)


def test_whole_model_stage_takes_everything_once() -> None:
    names = list(opt_tensors(layers=3))
    assert sorted(stage_tensors(names, StageSpec.whole(3), OPT)) == sorted(names)
    assert num_layers_in(names, OPT) == 3


def test_streaming_order_puts_layers_in_numeric_order() -> None:
    names = sorted(llama_tensors(layers=12))  # file order is alphabetical: 0, 1, 10, 11, 2...
    ordered = stage_tensors(names, StageSpec.whole(12), LLAMA)
    layers = [LLAMA.role(n).layer for n in ordered if LLAMA.role(n).layer is not None]
    assert layers == sorted(layers)
    assert ordered[0] == "model.embed_tokens.weight"
    assert set(ordered[-2:]) == {"model.norm.weight", "lm_head.weight"}
    groups = [segment_group(LLAMA.role(n)) for n in ordered]
    assert groups == sorted(groups, key=lambda g: g[0]) and groups[0] == (0, "embed") and groups[-1][1] == "head"


def test_profile_counts_embedding_first_and_head_last() -> None:
    sizes = {n: t.numel() * t.element_size() for n, t in llama_tensors(layers=3, tie=True).items()}
    profile = stage_byte_profile(sizes, LLAMA_TIED)
    emb = sizes["model.embed_tokens.weight"]
    assert profile.first_extra_bytes == emb
    assert profile.last_extra_bytes == emb + sizes["model.norm.weight"]
    assert profile.tied_bytes == emb and profile.total_bytes == sum(sizes.values())  # held once whole
    assert len(profile.per_layer_bytes) == 3
    assert sum(profile.per_layer_bytes) == sum(v for n, v in sizes.items() if ".layers." in n)


@pytest.mark.parametrize("p", [1, 2, 3, 4])
def test_balanced_plan_tiles_and_is_within_one_layer_of_ideal(p: int) -> None:
    rng = random.Random(p)
    for _ in range(30):
        n = rng.randint(p, 40)
        layers = [rng.randint(50, 150) for _ in range(n)]
        first, last = rng.randint(0, 300), rng.randint(0, 300)
        plan = balanced_stage_plan(layers, first, last, p)

        assert len(plan.stages) == p and plan.num_layers == n  # StagePlan validates tiling
        loads = [sum(layers[s.layer_start:s.layer_end]) + (first if s.is_first else 0)
                 + (last if s.is_last else 0) for s in plan.stages]
        assert all(s.layer_end > s.layer_start for s in plan.stages)
        ideal = (sum(layers) + first + last) / p
        assert max(loads) <= max(ideal + max(layers), first + layers[0], last + layers[-1])


def test_balanced_plan_gives_the_heavy_ends_fewer_layers() -> None:
    plan = balanced_stage_plan([100] * 12, first_extra_bytes=300, last_extra_bytes=300, p=3)
    sizes = [s.layer_end - s.layer_start for s in plan.stages]
    assert sizes == [3, 6, 3]  # 600 bytes per stage: perfectly balanced


def test_balanced_plan_rejects_impossible_sizes() -> None:
    with pytest.raises(ValueError):
        balanced_stage_plan([1, 2], 0, 0, 3)
    with pytest.raises(ValueError):
        balanced_stage_plan([1] * 10, 0, 0, 5)


@pytest.fixture(scope="module")
def every_architecture(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from hydraserve.modeltools.tiny import ARCHITECTURES, TinySpec, make_tiny_model

    root = tmp_path_factory.mktemp("archs")
    return {arch: make_tiny_model(root / arch, TinySpec(arch=arch, layers=4)) for arch in ARCHITECTURES}


def test_every_architecture_slices_into_stages_that_cover_it(every_architecture: dict[str, Path]) -> None:
    """Real checkpoints of the 11 architectures vLLM serves here: for p = 1..4 the stages hold every
    tensor once, the tied embedding excepted (the first stage's input, the last stage's head)."""
    from hydraserve.weights.model_files import LocalModelFiles

    for arch_name, root in every_architecture.items():
        files = LocalModelFiles(root)
        arch, index = files.architecture(), files.tensor_index()
        assert num_layers_in(index, arch) == 4, arch_name
        unused = {n for n in index if arch.role(n).part is Part.UNUSED}
        for p in range(1, 5):
            stages = _stages(4, [0, *range(1, p), 4])
            slices = [set(stage_tensors(index, s, arch)) for s in stages]
            assert set().union(*slices) == set(index) - unused, (arch_name, p)
            shared = set.intersection(slices[0], slices[-1]) if p > 1 else set()
            tied = head_is_embedding(index, arch)
            assert len(shared) == (1 if tied and p > 1 else 0), (arch_name, p, shared)
            assert all(arch.role(n).part is Part.EMBEDDING for n in shared)
