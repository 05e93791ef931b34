"""The demo's model: generate (or take) a Hugging Face directory and push it to the embedded S3.
(Its description for the planner is hydraserve.provider.model_spec's, as for any function.)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

BUCKET = "models"


def prepare_and_push(s3: Any, workdir: Path, model_dir: Path | None, tiny: dict[str, Any],
                     name: str, *, progress: bool = True) -> str:
    """Push ``model_dir`` (or a freshly generated tiny model) to the embedded S3; its URI."""
    if model_dir is None:
        from hydraserve.modeltools.tiny import TinySpec, make_tiny_model

        model_dir = make_tiny_model(workdir, TinySpec(**tiny))
    return push_directory(s3, model_dir, name, progress=progress)


def push_directory(s3: Any, model_dir: Path, name: str, *, progress: bool = True) -> str:
    """Push a Hugging Face directory to s3://models/<name> on the embedded S3; its URI."""
    from hydraserve.weights.push import push_model

    if not (model_dir / "config.json").is_file():
        raise ValueError(f"{model_dir} is not a Hugging Face model directory (no config.json)")
    s3.create_bucket(BUCKET)
    uri = f"s3://{BUCKET}/{name}"
    push_model(model_dir, uri, progress=progress, client=s3.client())
    return uri
