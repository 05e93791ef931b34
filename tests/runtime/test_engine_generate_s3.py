"""``hydraserve generate`` and load_engine on an s3:// model (embedded moto S3 over HTTP):
same tokens as the local directory, and only the model's tensors are fetched."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from hydraserve.runtime.engine.factory import load_engine
from hydraserve.runtime.engine.types import SamplingParams
from hydraserve.weights.tensor_sources import tensor_source


def test_generate_from_s3_equals_local(s3_server: Any, tiny_opt_dir: Path) -> None:
    uri = s3_server.upload_dir(tiny_opt_dir, "runtime-generate", "tiny-opt")
    env = {**os.environ, **s3_server.client_env()}
    proc = subprocess.run(
        [sys.executable, "-m", "hydraserve.cli", "generate", "--model", uri, "--endpoint-url",
         s3_server.endpoint_url, "--prompt", "The lighthouse keeper", "--max-tokens", "10", "--quiet"],
        capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr
    from_s3 = json.loads(proc.stdout.strip().splitlines()[-1])
    local = load_engine(tiny_opt_dir)
    try:
        ids = local.tokenizer.encode("The lighthouse keeper")
        expected = local.submit(ids, SamplingParams(max_tokens=10, temperature=0.0)).collect()
    finally:
        local.shutdown()
    assert from_s3["prompt_token_ids"] == ids
    assert from_s3["token_ids"] == expected.token_ids
    assert from_s3["text"] == expected.text


def test_stage_loads_from_s3_like_from_local(s3_server: Any, tiny_llama_dir: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from hydraserve.contracts.stage import StagePlan
    from hydraserve.runtime.model.config import ModelConfig
    from hydraserve.runtime.model.loader import load_stage
    from hydraserve.weights.model_files import LocalModelFiles, open_model

    for key, value in s3_server.client_env().items():
        monkeypatch.setenv(key, value)
    uri = s3_server.upload_dir(tiny_llama_dir, "runtime-stage", "tiny-llama")
    remote, local = open_model(uri, s3_server.endpoint_url), LocalModelFiles(tiny_llama_dir)
    cfg = ModelConfig.from_json(remote.read_text("config.json"))
    last = StagePlan.from_boundaries(cfg.num_layers, [0, 1, 2]).stages[1]
    names = remote.stage_tensor_names(last)
    assert names == local.stage_tensor_names(last)
    from_s3 = load_stage(cfg, tensor_source(remote, names), last)
    from_disk = load_stage(cfg, tensor_source(local, names), last)
    hidden = torch.randn(1, 4, cfg.hidden_size)
    positions = torch.arange(4)[None]
    s3_params, disk_params = dict(from_s3.named_parameters()), dict(from_disk.named_parameters())
    assert s3_params.keys() == disk_params.keys()
    assert all(torch.equal(s3_params[n], disk_params[n]) for n in s3_params)  # same bytes
    # same math; buffer alignment may pick a different SIMD path, hence not bit-exact
    torch.testing.assert_close(from_s3(hidden, positions), from_disk(hidden, positions))
