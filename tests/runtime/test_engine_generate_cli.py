"""``hydraserve generate`` end to end: a subprocess on a tiny local model, checked against
transformers' greedy generate() on the same weights."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch


def _generate(model_dir: Path, *extra: str) -> tuple[dict[str, object], subprocess.CompletedProcess[str]]:
    proc = subprocess.run(
        [sys.executable, "-m", "hydraserve.cli", "generate", "--model", str(model_dir), *extra],
        capture_output=True, text=True, timeout=120)
    last = proc.stdout.strip().splitlines()[-1]
    return json.loads(last), proc


@pytest.mark.parametrize("fixture", ["tiny_llama_dir", "tiny_opt_dir"])
def test_generate_cli_equals_transformers_greedy(fixture: str, request: pytest.FixtureRequest) -> None:
    import transformers
    model_dir: Path = request.getfixturevalue(fixture)
    result, proc = _generate(model_dir, "--prompt", "The lighthouse keeper", "--max-tokens", "12")
    assert proc.returncode == 0, proc.stderr
    hf_tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir).eval()
    ids = hf_tok("The lighthouse keeper", return_tensors="pt").input_ids
    expected = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False)
    assert result["prompt_token_ids"] == ids[0].tolist()
    assert result["token_ids"] == expected[0, ids.shape[1]:].tolist()
    assert result["text"] == hf_tok.decode(result["token_ids"], skip_special_tokens=True)
    assert result["finish_reason"] in ("length", "stop")


def test_generate_cli_reports_context_error_as_json(tiny_llama_dir: Path) -> None:
    result, proc = _generate(tiny_llama_dir, "--prompt", "Hi", "--max-tokens", "100000", "--quiet")
    assert proc.returncode == 1
    error = result["error"]
    assert isinstance(error, dict) and error["code"] == "context_length_exceeded"


def test_generate_cli_sampling_with_seed_matches_the_engine(tiny_opt_dir: Path) -> None:
    from hydraserve.runtime.engine.factory import load_engine
    from hydraserve.runtime.engine.types import SamplingParams

    result, _ = _generate(tiny_opt_dir, "--prompt", "Hello", "--max-tokens", "10", "--temperature", "1.0",
                          "--top-p", "0.9", "--seed", "7", "--quiet")
    engine = load_engine(tiny_opt_dir)
    try:
        ids = engine.tokenizer.encode("Hello")
        same = engine.submit(ids, SamplingParams(max_tokens=10, temperature=1.0, top_p=0.9, seed=7)).collect()
        greedy = engine.submit(ids, SamplingParams(max_tokens=10, temperature=0.0)).collect()
    finally:
        engine.shutdown()
    assert result["token_ids"] == same.token_ids != greedy.token_ids


def test_generate_cli_chat_uses_the_models_template(tiny_llama_dir: Path) -> None:
    from hydraserve.runtime.tokenizer import Tokenizer

    result, proc = _generate(tiny_llama_dir, "--prompt", "Hi there", "--chat", "--max-tokens", "3", "--quiet",
                             "--threads", "1")
    assert proc.returncode == 0, proc.stderr
    tok = Tokenizer.from_dir(str(tiny_llama_dir))
    assert result["prompt_token_ids"] == tok.encode("<|user|>\nHi there</s>\n<|assistant|>\n")
