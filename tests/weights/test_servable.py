"""What the serving engine runs is asked of vLLM's own registry (hydraserve/weights/servable.py):
every architecture our generated models use is there, others are refused by name at
``model push`` (before a byte is uploaded) and when a function is created."""

from __future__ import annotations

import json
import shutil
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


def test_model_push_refuses_an_unsupported_architecture_before_uploading(
        tiny_llama_dir: Path, s3_server: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in s3_server.client_env().items():
        monkeypatch.setenv(key, value)
    model = tmp_path / "bert"
    shutil.copytree(tiny_llama_dir, model)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps(config | {"architectures": ["BertForMaskedLM"]}))
    client = s3_server.client()
    client.create_bucket("servable")
    assert main(["model", "push", str(model), "s3://servable/bert", "--no-progress",
                 "--endpoint-url", s3_server.endpoint_url]) == 1
    assert "vLLM does not run the architecture BertForMaskedLM" in capsys.readouterr().err
    assert client.list_prefix("servable", "bert") == []  # not a byte uploaded
