"""The worker's slow start-up path: config + tokenizer, weights source, model, engine.

Called by the worker's loader thread (runtime/worker.py) after the HTTP server is up.
Files come through the node's loaderd when the model lives in S3 (config and tokenizer over its
API, read while torch imports; weights as zero-copy views of its shared memory, fetched since
placement), straight from S3 when no daemon answers, or from a local directory. Each step is
marked on the start-up timeline.
"""

from __future__ import annotations

from hydraserve.contracts.stage import StageSpec
from hydraserve.contracts.timeline import Timeline
from hydraserve.loaderd.client import LoaderUnavailableError
from hydraserve.runtime.engine.engine import LLMEngine
from hydraserve.runtime.engine.factory import DEFAULT_MAX_MODEL_LEN, generation_eos_ids
from hydraserve.runtime.engine.runner import ModelRunner
from hydraserve.runtime.engine.types import SamplingParams
from hydraserve.runtime.loader_files import LoaderModelFiles
from hydraserve.runtime.model.config import ModelConfig
from hydraserve.runtime.model.files import ModelFiles, open_model_files
from hydraserve.runtime.model.loader import load_stage
from hydraserve.runtime.model.names import stage_tensor_names
from hydraserve.runtime.settings import WorkerSettings
from hydraserve.runtime.tokenizer import Tokenizer


def open_files(settings: WorkerSettings, early: LoaderModelFiles | None, timeline: Timeline) -> ModelFiles:
    """The worker's files: through loaderd when it answers, else S3 or the local directory."""
    if early is not None:
        try:
            early.read_text("config.json")
            return early
        except LoaderUnavailableError as exc:
            timeline.mark("loaderd_fallback", reason=exc.message)
    return open_model_files(settings.model_uri, settings.s3_endpoint_url)


def load_engine(settings: WorkerSettings, timeline: Timeline, early: LoaderModelFiles | None = None) -> LLMEngine:
    """Everything between 'libraries imported' and 'engine ready'."""
    if settings.torch_threads:
        # Several workers sharing a few cores: OpenMP barriers with a descheduled thread made
        # decode 5-6x slower with 2 threads than with 1 on a loaded 2-core machine.
        import torch

        torch.set_num_threads(settings.torch_threads)
    files = open_files(settings, early, timeline)
    cfg = ModelConfig.from_json(files.read_text("config.json"))
    tokenizer = Tokenizer.from_files(files, eos_token_ids=[*cfg.eos_token_ids, *generation_eos_ids(files)])
    timeline.mark("config_loaded")
    stage = settings.stage or StageSpec.whole(cfg.num_layers)
    if stage.num_stages != 1:
        raise ValueError("this worker serves whole models; pipeline stages need the pipeline runtime")
    source = files.tensor_source(stage_tensor_names(cfg, stage))
    remote = settings.model_uri.startswith("s3://")
    timeline.mark("weights_attached", via=getattr(source, "via", None) or ("s3" if remote else "local"))
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
