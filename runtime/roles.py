"""The worker's start-up, second half: wire my role around the stage I loaded.

A pipeline group has one head and up to three inner stages (docs/PROTOCOLS.md, the stage plan:
stage 0 holds the embeddings, the last stage the LM head). The head (stage 0, or a whole model) owns the
tokenizer, the scheduler and sampling, and serves the OpenAI and CloudEvents API; an inner
stage holds its layers and their KV cache, reads no tokenizer and serves no API (only health,
readiness, metrics and its timeline). ``prepare`` runs before the weights load, overlapping the
fetch; ``wire`` runs after. Called by runtime/worker.py.

Groups do not serve yet: a head over part of the model refuses until the stage transport exists
(the pipeline runtime); the inner role is built and tested, and serves nothing but its health.
"""

from __future__ import annotations

from typing import Protocol

from hydraserve.contracts.timeline import Timeline
from hydraserve.contracts.worker import WorkerEnvironment
from hydraserve.runtime.engine.engine import LLMEngine
from hydraserve.runtime.engine.factory import LoadedStage, build_engine, context_limit, load_tokenizer
from hydraserve.runtime.engine.runner import StageRunner
from hydraserve.runtime.engine.types import SamplingParams
from hydraserve.runtime.model.config import ModelConfig
from hydraserve.runtime.tokenizer import Tokenizer
from hydraserve.weights.model_files import ModelFiles


class Role(Protocol):
    name: str

    def prepare(self, files: ModelFiles, config: ModelConfig) -> None:
        """Work that needs no weights (runs while they are still arriving)."""
        ...

    def wire(self, loaded: LoadedStage, timeline: Timeline) -> LLMEngine | StageRunner:
        """What this worker serves, from its loaded stage."""
        ...


class HeadRole:
    """Stage 0: tokenizer, scheduler, sampling, and the OpenAI + CloudEvents server."""

    name = "head"

    def __init__(self, settings: WorkerEnvironment) -> None:
        self._settings = settings
        self.tokenizer: Tokenizer | None = None

    def prepare(self, files: ModelFiles, config: ModelConfig) -> None:
        self.tokenizer = load_tokenizer(files, config)

    def wire(self, loaded: LoadedStage, timeline: Timeline) -> LLMEngine:
        stage = loaded.model.stage
        if stage.num_stages != 1:
            raise ValueError("a pipeline group's head needs the stage transport, which is not built yet: "
                             "this worker serves whole models only")
        assert self.tokenizer is not None, "prepare() first"
        settings = self._settings
        engine = build_engine(loaded, self.tokenizer, max_num_seqs=settings.max_batch,
                              max_model_len=settings.max_model_len,
                              model_name=settings.function or settings.model_uri.rstrip("/").rsplit("/", 1)[-1])
        engine.start()
        for _ in engine.submit([0], SamplingParams(max_tokens=1, temperature=0.0)):
            pass  # one tiny forward: the first user request should not pay page faults and setup
        timeline.mark("warmed_up")
        return engine


class InnerStageRole:
    """Stages 1..p-1: its layers and their KV cache; no tokenizer, no API server."""

    name = "stage"

    def __init__(self, settings: WorkerEnvironment) -> None:
        self._settings = settings

    def prepare(self, files: ModelFiles, config: ModelConfig) -> None:
        """Nothing: an inner stage never tokenizes."""

    def wire(self, loaded: LoadedStage, timeline: Timeline) -> StageRunner:
        limit = context_limit(loaded.config, self._settings.max_model_len)
        runner = StageRunner(loaded.model, self._settings.max_batch, limit)
        timeline.mark("kv_cache_allocated", slots=self._settings.max_batch, max_model_len=limit)
        return runner


def role_for(settings: WorkerEnvironment) -> HeadRole | InnerStageRole:
    """The head for stage 0 (or a whole model), an inner stage otherwise."""
    return HeadRole(settings) if settings.is_head else InnerStageRole(settings)
