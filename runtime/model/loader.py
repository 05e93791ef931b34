"""Build one pipeline stage on the meta device and pull in only its own tensors.

Called by the engine factory (hydraserve.runtime.engine.factory), the stage workers and the
consolidation path. Which tensors a stage holds and which parameter each fills is the stage
slicer's decision (hydraserve.weights.layout.stage_parameters, the same one loaderd prefetches
by); tensors are requested in its streaming order (embeddings, layers a..b-1, head), so a
source still streaming bytes (loaderd shared memory, S3) is read in the order it arrives. A
tensor whose dtype and device already match is used as is: no copy, and it may be a read-only
view of shared memory (the model never writes its weights).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

import torch
from torch import nn

from hydraserve.contracts.stage import StageSpec
from hydraserve.runtime.model.config import ModelConfig
from hydraserve.runtime.model.layers import StageModel
from hydraserve.runtime.model.llama import LlamaStage
from hydraserve.weights.layout import stage_parameters
from hydraserve.weights.source import TensorSource

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class WeightMismatchError(ValueError):
    """A checkpoint tensor does not fit the model config.json describes (shape, or no such parameter)."""


def resolve_dtype(cfg: ModelConfig, dtype: str | torch.dtype | None) -> torch.dtype:
    """The compute dtype: the one asked for, else the checkpoint's."""
    if isinstance(dtype, torch.dtype):
        return dtype
    name = dtype or cfg.dtype
    if name not in DTYPES:
        raise ValueError(f"unsupported dtype {name!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[name]


def build_stage(cfg: ModelConfig, stage: StageSpec | None = None) -> StageModel:
    """The stage's modules on the meta device (no memory, no init)."""
    from hydraserve.runtime.model.opt import OPTStage

    stage = stage or StageSpec.whole(cfg.num_layers)
    if stage.num_layers != cfg.num_layers:
        raise ValueError(f"stage spans {stage.num_layers} layers, model has {cfg.num_layers}")
    cls = LlamaStage if cfg.family == "llama" else OPTStage
    with torch.device("meta"):
        return cls(cfg, stage)


def _assign(model: nn.Module, name: str, tensor: torch.Tensor, checkpoint_name: str) -> None:
    module_path, _, leaf = name.rpartition(".")
    try:
        module = model.get_submodule(module_path)
    except AttributeError:
        module = None
    current = None if module is None else module._parameters.get(leaf)
    if module is None or current is None:
        raise WeightMismatchError(f"checkpoint tensor {checkpoint_name} fills {name}, which the model "
                                  "config.json describes does not have")
    if tuple(current.shape) != tuple(tensor.shape):
        raise WeightMismatchError(f"{name}: checkpoint shape {tuple(tensor.shape)}, expected {tuple(current.shape)}")
    module._parameters[leaf] = nn.Parameter(tensor, requires_grad=False)


def load_stage(cfg: ModelConfig, source: TensorSource, stage: StageSpec | None = None, *,
               dtype: str | torch.dtype | None = None, device: str | torch.device = "cpu",
               on_tensor: Callable[[str, float], None] | None = None) -> StageModel:
    """Build ``stage`` (default: whole model) and fill it from ``source``; ready for forward.

    ``on_tensor(checkpoint_name, seconds_waited)`` is called after each tensor is assigned
    (start-up timelines use it to show loading overlapping the fetch).
    """
    model = build_stage(cfg, stage)
    _fill(model, source, {}, resolve_dtype(cfg, dtype), torch.device(device), on_tensor)
    return model


def grow_stage(model: StageModel, source: TensorSource, target: StageSpec, *,
               checkpoint_names: Iterable[str] | None = None,
               on_tensor: Callable[[str, float], None] | None = None) -> StageModel:
    """A model for ``target`` (usually the whole model) that reuses every tensor ``model``
    already holds and reads only the rest from ``source``: pipeline consolidation, where a
    worker with memory for the whole model loads the other stages' layers in the background.
    ``checkpoint_names`` (default: the source's) is the whole checkpoint's tensor names, for a
    source that holds only the missing ones.
    """
    cfg = model.config
    if not (target.layer_start <= model.stage.layer_start and model.stage.layer_end <= target.layer_end):
        raise ValueError(f"target layers [{target.layer_start}, {target.layer_end}) do not contain "
                         f"[{model.stage.layer_start}, {model.stage.layer_end})")
    names = list(checkpoint_names) if checkpoint_names is not None else source.tensor_names()
    held = dict(model.named_parameters())
    loaded = {ckpt: held[ours[0]].detach()
              for ckpt, ours in stage_parameters(names, model.stage, cfg.architecture).items()}
    first = next(iter(held.values()))
    grown = build_stage(cfg, target)
    _fill(grown, source, loaded, first.dtype, first.device, on_tensor, names)
    return grown


def _fill(model: StageModel, source: TensorSource, loaded: dict[str, torch.Tensor], dtype: torch.dtype,
          device: torch.device, on_tensor: Callable[[str, float], None] | None,
          names: Iterable[str] | None = None) -> None:
    """Assign every parameter in load order; ``loaded`` (by checkpoint name) is reused, so tensors
    a previous stage already held are read once (a tied head's embedding is read once anyway)."""
    plan = stage_parameters(source.tensor_names() if names is None else names, model.stage,
                            model.config.architecture)
    for ckpt_name, params in plan.items():
        tensor = loaded.get(ckpt_name)
        if tensor is None:
            start = time.perf_counter()
            tensor = source.get(ckpt_name)
            waited = time.perf_counter() - start
            if tensor.dtype != dtype or tensor.device != device:
                tensor = tensor.to(device=device, dtype=dtype)
            loaded[ckpt_name] = tensor
            if on_tensor is not None:
                on_tensor(ckpt_name, waited)
        for name in params:
            _assign(model, name, tensor, ckpt_name)
    missing = [n for n, p in model.named_parameters() if p.is_meta]
    if missing:
        raise WeightMismatchError(f"parameters left unloaded: {missing[:5]}")
    model.materialize(device)
    model.eval()
