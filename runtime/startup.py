"""The worker's slow start-up path: config + tokenizer, weights source, model, engine.

Called by the worker's loader thread (runtime/worker.py) after the HTTP server is up.
Weights come from the node's loaderd (zero-copy shared memory, fetch already running since
placement) when the model lives in S3, or straight from S3 through the same fetch code when no
daemon answers, or from a local directory. Each step is marked on the start-up timeline.
"""

from __future__ import annotations

from hydraserve.contracts.stage import StageSpec
from hydraserve.contracts.timeline import Timeline
from hydraserve.runtime.engine.engine import LLMEngine
from hydraserve.runtime.engine.factory import DEFAULT_MAX_MODEL_LEN, generation_eos_ids
from hydraserve.runtime.engine.runner import ModelRunner
from hydraserve.runtime.engine.types import SamplingParams
from hydraserve.runtime.model.config import ModelConfig
from hydraserve.runtime.model.files import ModelFiles, open_model_files
from hydraserve.runtime.model.loader import load_stage
from hydraserve.runtime.model.names import stage_tensor_names
from hydraserve.runtime.settings import WorkerSettings
from hydraserve.runtime.tokenizer import Tokenizer
from hydraserve.weights.source import TensorSource


def open_weights(settings: WorkerSettings, files: ModelFiles, cfg: ModelConfig, stage: StageSpec,
                 timeline: Timeline) -> TensorSource:
    """loaderd shared memory for s3:// models (S3 fallback inside), else the files' own source."""
    if not settings.model_uri.startswith("s3://"):
        source = files.tensor_source(stage_tensor_names(cfg, stage))
        timeline.mark("weights_attached", via="local")
        return source
    from hydraserve.runtime.shm_source import open_shm_source

    def on_fallback(reason: str) -> None:
        timeline.mark("loaderd_fallback", reason=reason)

    source = open_shm_source(
        settings.model_uri, stage=None if stage.num_stages == 1 else stage,
        loader_url=settings.loaderd_url, token=settings.loaderd_token,
        endpoint_url=settings.s3_endpoint_url, on_fallback=on_fallback)
    timeline.mark("weights_attached", via=getattr(source, "via", "loaderd"))
    return source


def load_engine(settings: WorkerSettings, timeline: Timeline) -> LLMEngine:
    """Everything between 'libraries imported' and 'engine ready'."""
    if settings.torch_threads:
        # Several workers sharing a few cores: OpenMP barriers with a descheduled thread made
        # decode 5-6x slower with 2 threads than with 1 on a loaded 2-core machine.
        import torch

        torch.set_num_threads(settings.torch_threads)
    files = open_model_files(settings.model_uri, settings.s3_endpoint_url)
    cfg = ModelConfig.from_json(files.read_text("config.json"))
    tokenizer = Tokenizer.from_files(files, eos_token_ids=[*cfg.eos_token_ids, *generation_eos_ids(files)])
    timeline.mark("config_loaded")
    stage = settings.stage or StageSpec.whole(cfg.num_layers)
    if stage.num_stages != 1:
        raise ValueError("this worker serves whole models; pipeline stages need the pipeline runtime")
    source = open_weights(settings, files, cfg, stage, timeline)
    waited = [0.0]

    def on_tensor(_name: str, seconds_waited: float) -> None:
        if not waited[0] and not any(e.name == "first_tensor_loaded" for e in timeline.events):
            timeline.mark("first_tensor_loaded")
        waited[0] += seconds_waited

    # The source stays open for the worker's life: with loaderd, the weights ARE the shared
    # memory segments, and the lease (tied to our pid) keeps them from eviction.
    model = load_stage(cfg, source, stage, dtype=settings.dtype, on_tensor=on_tensor)
    timeline.mark("weights_loaded", waited_for_bytes_s=round(waited[0], 3))
    limit = min(cfg.max_position_embeddings, settings.max_model_len or DEFAULT_MAX_MODEL_LEN)
    engine = LLMEngine(ModelRunner(model, settings.max_batch, limit), tokenizer,
                       model_name=settings.function_name or settings.model_uri.rstrip("/").rsplit("/", 1)[-1],
                       max_model_len=limit, vocab_size=cfg.vocab_size, max_num_seqs=settings.max_batch)
    engine.start()
    for _ in engine.submit([0], SamplingParams(max_tokens=1, temperature=0.0)):
        pass  # one tiny forward: the first user request should not pay page faults and setup
    timeline.mark("warmed_up")
    return engine
