"""load_engine: model directory or s3:// URI -> a started LLMEngine (the convenience path).

Used by ``hydraserve generate``, the single-worker server and tests. Reads config.json and the
tokenizer files through the ModelFiles seam (local or S3), opens a TensorSource asking for
only the tensors the model needs, builds the model with the meta-device loader and wraps it
in a ModelRunner. Pipelined workers build their stage with loader.load_stage directly.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from hydraserve.runtime.engine.engine import LLMEngine
from hydraserve.runtime.engine.runner import ModelRunner
from hydraserve.runtime.model.config import ModelConfig
from hydraserve.runtime.model.files import ModelFiles, open_model_files, read_optional
from hydraserve.runtime.model.layers import StageModel
from hydraserve.runtime.model.loader import load_stage
from hydraserve.runtime.model.names import stage_tensor_names
from hydraserve.runtime.tokenizer import Tokenizer

DEFAULT_MAX_MODEL_LEN = 4096  # caps the KV cache of long-context models unless asked otherwise


def generation_eos_ids(files: ModelFiles) -> list[int]:
    """EOS ids from generation_config.json (Llama 3 lists several)."""
    text = read_optional(files, "generation_config.json")
    if not text:
        return []
    eos = json.loads(text).get("eos_token_id")
    return [int(e) for e in eos] if isinstance(eos, list) else ([int(eos)] if eos is not None else [])


def load_model(files: ModelFiles, *, dtype: str | torch.dtype | None = None,
               device: str = "cpu") -> tuple[ModelConfig, StageModel, Tokenizer]:
    """Config, whole model and tokenizer of a model, through the ModelFiles seam."""
    cfg = ModelConfig.from_json(files.read_text("config.json"))
    tokenizer = Tokenizer.from_files(files, eos_token_ids=[*cfg.eos_token_ids, *generation_eos_ids(files)])
    source = files.tensor_source(stage_tensor_names(cfg))
    try:
        model = load_stage(cfg, source, dtype=dtype, device=device)
    finally:
        # Local memory-mapped tensors stay valid after close; shared-memory sources keep the
        # segment mapped for the lifetime of the tensors they returned.
        source.close()
    return cfg, model, tokenizer


def load_engine(model: str | Path | ModelFiles, *, endpoint_url: str | None = None,
                dtype: str | torch.dtype | None = None, max_model_len: int | None = None,
                max_num_seqs: int = 8, model_name: str | None = None, start: bool = True) -> LLMEngine:
    """Load a model (local dir, s3:// URI or ModelFiles) into an engine, started by default."""
    files = open_model_files(model, endpoint_url) if isinstance(model, str | Path) else model
    cfg, stage_model, tokenizer = load_model(files, dtype=dtype)
    limit = min(cfg.max_position_embeddings, max_model_len or DEFAULT_MAX_MODEL_LEN)
    engine = LLMEngine(
        ModelRunner(stage_model, max_num_seqs, limit), tokenizer,
        model_name=model_name or (str(model).rstrip("/").rsplit("/", 1)[-1] if isinstance(model, str | Path)
                                  else "model"),
        max_model_len=limit, vocab_size=cfg.vocab_size, max_num_seqs=max_num_seqs,
    )
    return engine.start() if start else engine
