"""The demo's model: generate (or take) a Hugging Face directory, push it, describe its sizes.

``describe_model`` builds the placement service's FunctionSpec from the model in S3 itself
(config.json plus the safetensors headers, one ranged GET each), so the planner sizes
stages by the real bytes of each layer, embeddings and head.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from hydraserve.activator.functions import FunctionConfig
from hydraserve.contracts.plan import FunctionSpec

BUCKET = "models"


def prepare_and_push(s3: Any, workdir: Path, model_dir: Path | None, tiny: dict[str, Any],
                     name: str, *, progress: bool = True) -> str:
    """Push ``model_dir`` (or a freshly generated tiny model) to the embedded S3; its URI."""
    from hydraserve.weights.push import push_model

    if model_dir is None:
        from hydraserve.modeltools.tiny import TinySpec, make_tiny_model

        model_dir = make_tiny_model(workdir, TinySpec(**tiny))
    s3.create_bucket(BUCKET)
    uri = f"s3://{BUCKET}/{name}"
    push_model(model_dir, uri, progress=progress, client=s3.client())
    return uri


def describe_model(function: FunctionConfig, client: Any) -> FunctionSpec:
    """The FunctionSpec of ``function``: its model's real per-layer bytes and its SLOs."""
    from hydraserve.weights.layout import stage_byte_profile
    from hydraserve.weights.model_files import open_model

    files = open_model(function.model_uri, client=client)
    config = json.loads(files.read_text("config.json"))
    sizes = {name: loc.entry.nbytes for name, loc in files.tensor_index().items()}
    profile = stage_byte_profile(sizes, bool(config.get("tie_word_embeddings", False)))
    return FunctionSpec(
        name=function.name, model_uri=function.model_uri, model_size_bytes=sum(sizes.values()),
        num_layers=len(profile.per_layer_bytes), layer_bytes=profile.per_layer_bytes,
        embed_bytes=profile.first_extra_bytes, head_bytes=min(
            profile.last_extra_bytes, sum(sizes.values()) - profile.first_extra_bytes),
        ttft_slo_s=function.ttft_slo_s, tpot_slo_s=function.tpot_slo_s)
