"""Model files -> a loaded stage -> an LLMEngine: the one way the runtime builds an engine.

``load_model`` loads a stage (default: the whole model) through the ModelFiles seam (a local
directory, S3, or the node's loaderd), asking the files for exactly the tensors the stage
slicer gives it; ``load_tokenizer`` reads the tokenizer; ``build_engine`` wraps a whole model
in a ModelRunner and an LLMEngine, ``start_engine`` starts it warmed up. A vLLM worker's first
requests (hydraserve.runtime.serving.first_token) go through these; ``load_engine`` is the same
in one call, for ``hydraserve generate`` and tests.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from hydraserve.contracts.stage import StageSpec
from hydraserve.runtime.engine.engine import LLMEngine
from hydraserve.runtime.engine.runner import ModelRunner
from hydraserve.runtime.engine.types import SamplingParams
from hydraserve.runtime.model.config import ModelConfig
from hydraserve.runtime.model.layers import StageModel
from hydraserve.runtime.model.loader import load_stage
from hydraserve.runtime.tokenizer import Tokenizer
from hydraserve.weights.model_files import ModelFiles, open_model
from hydraserve.weights.source import TensorSource
from hydraserve.weights.tensor_sources import tensor_source

DEFAULT_MAX_MODEL_LEN = 4096  # caps the KV cache of long-context models unless asked otherwise


@dataclass
class LoadedStage:
    """A stage built from a model's files, and the source its weights are views of. Keep the
    source open while the weights are used: through loaderd its lease keeps the segments."""

    config: ModelConfig
    model: StageModel
    source: TensorSource


def generation_eos_ids(files: ModelFiles) -> list[int]:
    """EOS ids from generation_config.json (Llama 3 lists several)."""
    text = files.read_optional("generation_config.json")
    if not text:
        return []
    eos = json.loads(text).get("eos_token_id")
    return [int(e) for e in eos] if isinstance(eos, list) else ([int(eos)] if eos is not None else [])


def load_tokenizer(files: ModelFiles, cfg: ModelConfig) -> Tokenizer:
    return Tokenizer.from_files(files, eos_token_ids=[*cfg.eos_token_ids, *generation_eos_ids(files)])


def load_model(files: ModelFiles, stage: StageSpec | None = None, *, config: ModelConfig | None = None,
               dtype: str | torch.dtype | None = None, device: str = "cpu",
               on_tensor: Callable[[str, float], None] | None = None,
               on_attached: Callable[[TensorSource], None] | None = None) -> LoadedStage:
    """``stage`` (default: the whole model) with its weights (``config``: config.json already
    parsed); ``on_attached`` is told when the source exists (its bytes may still be arriving),
    ``on_tensor`` after each tensor."""
    cfg = config or ModelConfig.from_hf(files.config())
    stage = stage or StageSpec.whole(cfg.num_layers)
    source = tensor_source(files, files.stage_tensor_names(stage))
    if on_attached is not None:
        on_attached(source)
    try:
        model = load_stage(cfg, source, stage, dtype=dtype, device=device, on_tensor=on_tensor)
    except BaseException:
        source.close()
        raise
    return LoadedStage(cfg, model, source)


def context_limit(cfg: ModelConfig, max_model_len: int | None) -> int:
    """Tokens per sequence the KV cache holds: ``max_model_len`` (default 4096), at most the model's context."""
    return min(cfg.max_position_embeddings, max_model_len or DEFAULT_MAX_MODEL_LEN)


def build_engine(loaded: LoadedStage, tokenizer: Tokenizer, *, max_num_seqs: int = 8,
                 max_model_len: int | None = None, model_name: str = "model") -> LLMEngine:
    """An engine (not started) over a whole model; its KV cache holds ``max_num_seqs`` sequences
    of up to :func:`context_limit` tokens."""
    cfg = loaded.config
    limit = context_limit(cfg, max_model_len)
    return LLMEngine(ModelRunner(loaded.model, max_num_seqs, limit), tokenizer, model_name=model_name,
                     max_model_len=limit, vocab_size=cfg.vocab_size, max_num_seqs=max_num_seqs)


def start_engine(loaded: LoadedStage, tokenizer: Tokenizer, *, max_num_seqs: int, max_model_len: int | None,
                 model_name: str) -> LLMEngine:
    """:func:`build_engine`, started and warmed up by one tiny forward: the first request should
    not pay set-up."""
    engine = build_engine(loaded, tokenizer, max_num_seqs=max_num_seqs, max_model_len=max_model_len,
                          model_name=model_name).start()
    for _ in engine.submit([0], SamplingParams(max_tokens=1, temperature=0.0)):
        pass
    return engine


def load_engine(model: str | Path | ModelFiles, *, endpoint_url: str | None = None,
                dtype: str | torch.dtype | None = None, max_model_len: int | None = None,
                max_num_seqs: int = 8, model_name: str | None = None, start: bool = True) -> LLMEngine:
    """Load a model (local dir, s3:// URI or ModelFiles) into an engine, started by default."""
    files = open_model(str(model), endpoint_url) if isinstance(model, str | Path) else model
    loaded = load_model(files, dtype=dtype)
    name = model_name or (str(model).rstrip("/").rsplit("/", 1)[-1] if isinstance(model, str | Path) else "model")
    engine = build_engine(loaded, load_tokenizer(files, loaded.config), max_num_seqs=max_num_seqs,
                          max_model_len=max_model_len, model_name=name)
    return engine.start() if start else engine
