"""Tensor roles, stage slices for llama and OPT (tied embeddings), balanced stage plans."""

from __future__ import annotations

import random

import pytest

from hydraserve.contracts.stage import StagePlan, StageSpec
from hydraserve.weights.layout import (
    Role,
    balanced_stage_plan,
    names_for_stage,
    num_layers_in,
    order_for_streaming,
    role_of,
    stage_byte_profile,
)

from .checkpoints import llama_tensors, opt_tensors


def _stages(num_layers: int, boundaries: list[int]) -> list[StageSpec]:
    return StagePlan.from_boundaries(num_layers, boundaries).stages


@pytest.mark.parametrize(("name", "role", "layer"), [
    ("model.embed_tokens.weight", Role.EMBEDDING, None),
    ("model.layers.0.self_attn.q_proj.weight", Role.LAYER, 0),
    ("model.layers.31.mlp.down_proj.weight", Role.LAYER, 31),
    ("model.norm.weight", Role.FINAL_NORM, None),
    ("lm_head.weight", Role.LM_HEAD, None),
    ("model.decoder.embed_tokens.weight", Role.EMBEDDING, None),
    ("model.decoder.embed_positions.weight", Role.POSITION_EMBEDDING, None),
    ("model.decoder.project_in.weight", Role.PROJECT_IN, None),
    ("model.decoder.layers.11.fc1.bias", Role.LAYER, 11),
    ("model.decoder.final_layer_norm.bias", Role.FINAL_NORM, None),
    ("model.decoder.project_out.weight", Role.PROJECT_OUT, None),
    ("model.rotary_emb.inv_freq", Role.OTHER, None),
    ("model.layersX.1.w", Role.OTHER, None),
    ("model.normalizer.weight", Role.OTHER, None),
])
def test_role_of(name: str, role: Role, layer: int | None) -> None:
    r = role_of(name)
    assert (r.role, r.layer) == (role, layer)


def test_llama_stages_partition_the_checkpoint() -> None:
    names = list(llama_tensors(layers=6))
    stages = _stages(6, [0, 2, 5, 6])
    slices = [names_for_stage(names, s, tie_word_embeddings=False) for s in stages]

    assert sorted(n for s in slices for n in s) == sorted(names)  # each tensor exactly once
    assert "model.embed_tokens.weight" in slices[0]
    assert {"model.norm.weight", "lm_head.weight"} <= set(slices[2])
    assert {role_of(n).layer for n in slices[1]} == {2, 3, 4}
    assert {role_of(n).layer for n in slices[2] if role_of(n).layer is not None} == {5}


def test_tied_llama_last_stage_also_gets_the_embedding() -> None:
    names = list(llama_tensors(layers=4, tie=True))
    first, last = _stages(4, [0, 2, 4])
    assert "model.embed_tokens.weight" in names_for_stage(names, last, tie_word_embeddings=True)
    assert "model.embed_tokens.weight" in names_for_stage(names, first, tie_word_embeddings=True)
    assert "model.norm.weight" not in names_for_stage(names, first, tie_word_embeddings=True)


def test_opt_stages_with_projections_and_no_lm_head() -> None:
    names = list(opt_tensors(layers=4, project=True))
    first, middle, last = _stages(4, [0, 1, 3, 4])
    s0 = set(names_for_stage(names, first, tie_word_embeddings=True))
    s1 = set(names_for_stage(names, middle, tie_word_embeddings=True))
    s2 = set(names_for_stage(names, last, tie_word_embeddings=True))
    assert {"model.decoder.embed_tokens.weight", "model.decoder.embed_positions.weight",
            "model.decoder.project_in.weight"} <= s0
    assert not any("embed" in n or "project" in n for n in s1)
    assert {"model.decoder.project_out.weight", "model.decoder.final_layer_norm.weight",
            "model.decoder.embed_tokens.weight"} <= s2  # tied head = the embedding
    assert "model.decoder.embed_positions.weight" not in s2
    # no lm_head in the file means the head is the embedding, even if the flag says untied
    assert "model.decoder.embed_tokens.weight" in names_for_stage(names, last, False)


def test_whole_model_stage_takes_everything_once() -> None:
    names = list(opt_tensors(layers=3))
    assert names_for_stage(names, StageSpec.whole(3), True) == names
    assert num_layers_in(names) == 3


def test_order_for_streaming_puts_layers_in_numeric_order() -> None:
    names = sorted(llama_tensors(layers=12))  # file order is alphabetical: 0, 1, 10, 11, 2...
    ordered = order_for_streaming(names)
    layers = [role_of(n).layer for n in ordered if role_of(n).layer is not None]
    assert layers == sorted(layers)
    assert ordered[0] == "model.embed_tokens.weight"
    assert set(ordered[-2:]) == {"model.norm.weight", "lm_head.weight"}


def test_profile_counts_embedding_first_and_head_last() -> None:
    sizes = {n: t.numel() * t.element_size() for n, t in llama_tensors(layers=3, tie=True).items()}
    profile = stage_byte_profile(sizes, tie_word_embeddings=True)
    emb = sizes["model.embed_tokens.weight"]
    assert profile.first_extra_bytes == emb
    assert profile.last_extra_bytes == emb + sizes["model.norm.weight"]
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
