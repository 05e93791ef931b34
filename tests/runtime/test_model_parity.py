"""Our model code against transformers on the same tiny random weights.

For each supported variant: full-sequence logits match in fp32, and greedy generation through
our engine (prefill + KV-cached batched decode) gives exactly transformers' generate() ids.
In bf16 and fp16 we compare against transformers also run in that dtype (both compute in the checkpoint
dtype; our ops follow its order, and the ids match exactly on these models).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers  # a test dependency: a broken install fails here, never skips

from hydraserve.modeltools.tiny import make_tiny_model
from hydraserve.runtime.engine.factory import load_engine
from hydraserve.runtime.engine.types import SamplingParams
from tests.variants import VARIANTS

PROMPTS = ["The lighthouse keeper", "Hello! How are you today?", "One, two, three, four"]
NEW_TOKENS = 24


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("parity")
    return {name: make_tiny_model(root / name, spec) for name, spec in VARIANTS.items()}


def _hf(model_dir: Path, dtype: torch.dtype) -> torch.nn.Module:
    return transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()


def _hf_greedy(model: torch.nn.Module, ids: list[int]) -> list[int]:
    x = torch.tensor([ids])
    out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=NEW_TOKENS, do_sample=False)
    return out[0, len(ids):].tolist()


@pytest.mark.parametrize("name", list(VARIANTS))
def test_greedy_ids_and_logits_match_transformers(model_dirs: dict[str, Path], name: str) -> None:
    spec = VARIANTS[name]
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[spec.dtype]
    engine = load_engine(model_dirs[name], max_num_seqs=2)
    try:
        model = engine.executor.model  # type: ignore[attr-defined]
        assert next(model.parameters()).dtype == dtype
        hf = _hf(model_dirs[name], dtype)
        ids = engine.tokenizer.encode(" ".join(PROMPTS))
        x = torch.tensor([ids])
        with torch.no_grad():
            ref_logits = hf(x).logits.float()
        ours = model(x, torch.arange(len(ids))[None], all_logits=True).float()
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(ours, ref_logits, atol=tol, rtol=tol)
        assert ref_logits.std() > 0.01  # the weights are not degenerate

        for prompt in PROMPTS:
            prompt_ids = engine.tokenizer.encode(prompt)
            got = engine.submit(prompt_ids, SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0)).collect()
            assert got.token_ids == _hf_greedy(hf, prompt_ids), prompt
            assert got.finish_reason == ("stop" if got.token_ids[-1] in engine.tokenizer.eos_token_ids else "length")
    finally:
        engine.shutdown()


def test_bf16_checkpoint_upcast_to_fp32_matches_transformers_fp32(model_dirs: dict[str, Path]) -> None:
    """--dtype float32 on a bf16 checkpoint computes in fp32, like transformers loaded as fp32."""
    directory = model_dirs["llama_gqa_bf16"]
    engine = load_engine(directory, dtype="float32")
    try:
        hf = _hf(directory, torch.float32)
        prompt_ids = engine.tokenizer.encode(PROMPTS[0])
        got = engine.submit(prompt_ids, SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0)).collect()
        assert got.token_ids == _hf_greedy(hf, prompt_ids)
    finally:
        engine.shutdown()
