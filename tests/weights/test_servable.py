"""What the serving engine runs is asked of vLLM's own registry (hydraserve/weights/servable.py):
every architecture our generated models use is there, others are refused by name at
``model push`` (before a byte is uploaded) and when a function is created."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from hydraserve.cli import main
from hydraserve.errors import UnsupportedModelError
from hydraserve.weights.servable import check_servable, vllm_architectures


def test_the_registry_lists_what_vllm_imports_and_every_generated_architecture(tmp_path: Path) -> None:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    from vllm.model_executor.models.registry import ModelRegistry  # the real thing, imported

    from hydraserve.modeltools.tiny import ARCHITECTURES

    read = vllm_architectures()
    assert read is not None and read <= set(ModelRegistry.get_supported_archs())
    for model_type in ARCHITECTURES:  # the class save_pretrained names in config.json
        check_servable({"architectures": [MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type]]}, model_type)


@pytest.mark.parametrize(("config", "named"), [
    ({"architectures": ["BertForMaskedLM"], "model_type": "bert"}, "BertForMaskedLM"),
    ({"architectures": ["LlamaForCausalLM", "MyOwnHead"]}, "MyOwnHead"),
    ({"model_type": "llama"}, "names no architecture"),
])
def test_what_vllm_does_not_run_is_refused_by_name(config: dict[str, Any], named: str) -> None:
    with pytest.raises(UnsupportedModelError, match=named):
        check_servable(config, "s3://models/x")


def _config(**changes: object) -> Callable[[Path], None]:
    def change(model: Path) -> None:
        config = json.loads((model / "config.json").read_text())
        (model / "config.json").write_text(json.dumps(config | changes))
    return change


def _pickled_only(model: Path) -> None:
    (model / "model.safetensors").rename(model / "pytorch_model.bin")


# kind -> (how the tiny Llama is spoiled, what the refusal says)
BAD_MODELS: dict[str, tuple[Callable[[Path], None], str]] = {
    "bert": (_config(architectures=["BertForMaskedLM"]), "vLLM does not run the architecture BertForMaskedLM"),
    "no-config": (lambda m: (m / "config.json").unlink(), "has no config.json"),
    "pickled": (_pickled_only, "no *.safetensors weights (only pytorch_model.bin): convert it"),
    "no-tokenizer": (lambda m: (m / "tokenizer.json").unlink(), "has no tokenizer.json"),
    "fp8": (_config(torch_dtype="float8_e4m3fn"), "its weights are float8_e4m3fn"),
    "head-16": (_config(head_dim=16), "its attention heads are 16 wide"),
}


def bad_model(good: Path, where: Path, kind: str) -> Path:
    shutil.copytree(good, where)
    BAD_MODELS[kind][0](where)
    return where


@pytest.mark.parametrize("kind", list(BAD_MODELS))
def test_model_push_refuses_a_model_vllm_cannot_serve_before_uploading(
        kind: str, tiny_llama_dir: Path, s3_server: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Each refusal names what is wrong (and how to fix it where a command can), and not a byte
    is uploaded."""
    model = bad_model(tiny_llama_dir, tmp_path / kind, kind)
    client = s3_server.client()
    client.create_bucket(bucket := f"servable-{kind}")
    assert main(["model", "push", str(model), f"s3://{bucket}/m", "--no-progress",
                 "--endpoint-url", s3_server.endpoint_url]) == 1
    assert BAD_MODELS[kind][1] in capsys.readouterr().err
    assert client.list_prefix(bucket, "m") == []
