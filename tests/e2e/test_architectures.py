"""Any architecture vLLM serves works end to end: generated models of 11 architectures users
deploy are pushed to the embedded S3, registered as functions, cold-started through the gateway
on vLLM workers (our load format through loaderd), and answer Hugging Face transformers' greedy
token ids (fp32) on the same weights."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
import torch

from hydraserve.embedded.stack import LocalStack, StackOptions
from hydraserve.modeltools.tiny import ARCHITECTURES, TinySpec, make_tiny_model

PROMPT_IDS = [1, 42, 338, 81, 265, 291, 325, 17]
SPECS = {arch: TinySpec(arch=arch, layers=2, kv_heads=1 if ARCHITECTURES[arch].gqa else None)
         for arch in ARCHITECTURES}


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("architectures")
    return {arch: make_tiny_model(root / arch, spec) for arch, spec in SPECS.items()}


@pytest.fixture(scope="module")
def stack(models: dict[str, Path]) -> Iterator[LocalStack]:
    options = StackOptions(nodes=1, model_dir=models["llama"], function_name="llama", idle_timeout_s=2.0,
                           progress=False, function={"keep_alive": "fixed"}, worker={"dtype": "float32"},
                           more_functions={name(arch): str(path) for arch, path in models.items() if arch != "llama"})
    with LocalStack(options) as s:
        yield s
    assert s.leftovers == []


def name(arch: str) -> str:
    """The function serving ``arch`` (function names are DNS labels)."""
    return arch.replace("_", "-")


def transformers_greedy(model_dir: Path, n: int) -> list[int]:
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    out = model.generate(torch.tensor([PROMPT_IDS]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                         pad_token_id=0)
    return out[0, len(PROMPT_IDS):].tolist()


@pytest.mark.parametrize("arch", list(SPECS))
def test_each_architecture_answers_transformers_greedy_through_the_gateway(stack: LocalStack, models: dict[str, Path],
                                                                          arch: str) -> None:
    r = requests.post(stack.gateway_url + "/v1/completions", timeout=180, json={
        "model": name(arch), "prompt": PROMPT_IDS, "max_tokens": 10, "temperature": 0, "ignore_eos": True})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["token_ids"] == transformers_greedy(models[arch], 10), arch
    timeline = stack.gateway.cold_start_timeline(name(arch))  # type: ignore[union-attr]
    attached = timeline.first("weights_attached")
    assert attached is not None and attached.detail["via"] == "loaderd"
