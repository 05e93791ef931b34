"""The worker's slow start-up: open the model's files (every worker) and load the whole model into
our compact engine (a worker whose first requests it answers: hydraserve.runtime.serving.first_token).

Called by the worker (hydraserve.runtime.serving.worker) after its HTTP server is up. Files come
through the node's loaderd for an s3:// model (config, tokenizer and the tensor index over its
API, read while vLLM imports; weights as zero-copy views of its shared memory, fetched since
placement), straight from S3 when no daemon is configured or none answers, or from a local
directory. Each step is marked on the start-up timeline.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from hydraserve.contracts.timeline import Moment, Timeline
from hydraserve.contracts.worker import WorkerEnvironment
from hydraserve.weights.model_files import ModelFiles

if TYPE_CHECKING:  # torch: imported by the loader thread, after the server listens
    from hydraserve.runtime.engine.factory import LoadedStage
    from hydraserve.runtime.model.config import ModelConfig


def open_files(settings: WorkerEnvironment, timeline: Timeline) -> ModelFiles:
    """The worker's files (light: no torch; boto3 only on the direct-S3 path)."""
    if settings.model_uri.startswith("s3://") and settings.loaderd_url:
        from hydraserve.runtime.loader_files import LoaderModelFiles

        def fell_back(reason: str) -> None:
            timeline.mark(Moment.LOADERD_FALLBACK, reason=reason)

        from hydraserve.auth import TokenFile

        # A pod's token file is re-read when renewed: it serves for days, its heartbeats with it.
        token: str | TokenFile = (TokenFile(settings.loaderd_token_file) if settings.loaderd_token_file else
                                  settings.loaderd_token.get_secret_value() if settings.loaderd_token else "")
        return LoaderModelFiles(settings.model_uri, settings.loaderd_url, token,
                                endpoint_url=settings.s3_endpoint_url, s3_retry_budget_s=settings.s3_retry_budget_s,
                                on_fallback=fell_back, heartbeat=settings.loaderd_lease == "heartbeat")
    from hydraserve.weights.model_files import open_model

    client = None
    if settings.model_uri.startswith("s3://"):
        from hydraserve.weights.retry import RetryPolicy
        from hydraserve.weights.s3 import S3Client

        client = S3Client(settings.s3_endpoint_url, retry=RetryPolicy(budget_s=settings.s3_retry_budget_s))
        if settings.s3_fetch == "download":
            from hydraserve.weights.download_first import DownloadFirstModelFiles
            from hydraserve.weights.s3_uri import parse_s3_uri

            return DownloadFirstModelFiles(parse_s3_uri(settings.model_uri), client)
    return open_model(settings.model_uri, settings.s3_endpoint_url, client=client)


def load_my_stage(settings: WorkerEnvironment, files: ModelFiles, timeline: Timeline,
                  prepare: Callable[[ModelFiles, ModelConfig], None]) -> LoadedStage:
    """Config -> ``prepare(files, config)`` (the role's work that overlaps the fetch) -> my
    stage's weights, each tensor taken as its bytes land."""
    from hydraserve.contracts.stage import StageSpec
    from hydraserve.runtime.engine.factory import load_model
    from hydraserve.runtime.model.config import ModelConfig

    if settings.torch_threads:
        # Several workers sharing a few cores: OpenMP barriers with a descheduled thread made
        # decode 5-6x slower with 2 threads than with 1 on a loaded 2-core machine.
        import torch

        torch.set_num_threads(settings.torch_threads)
    cfg = ModelConfig.from_hf(files.config())
    prepare(files, cfg)
    timeline.mark(Moment.CONFIG_LOADED)
    waited = [0.0]

    def attached(source: object) -> None:
        timeline.mark(Moment.WEIGHTS_ATTACHED, via=getattr(source, "via", None) or "local")

    def on_tensor(_name: str, seconds_waited: float) -> None:
        if timeline.first(Moment.FIRST_TENSOR_LOADED) is None:
            timeline.mark(Moment.FIRST_TENSOR_LOADED)
        waited[0] += seconds_waited

    loaded = load_model(files, settings.stage or StageSpec.whole(cfg.num_layers), config=cfg,
                        dtype=settings.dtype, on_tensor=on_tensor, on_attached=attached)
    timeline.mark(Moment.WEIGHTS_LOADED, waited_for_bytes_s=round(waited[0], 3))
    return loaded
