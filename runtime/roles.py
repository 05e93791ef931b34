"""The worker's start-up, second half: wire my role around the stage I loaded.

A pipeline group has one head and up to three inner stages (docs/PROTOCOLS.md, the stage plan:
stage 0 holds the embeddings, the last stage the LM head). The head (stage 0, or a whole model)
owns the tokenizer, the scheduler and sampling, and serves the OpenAI and CloudEvents API; for
a group it runs stage 0 itself and the rest round the ring (hydraserve.runtime.transport.group),
and is ready only once a ping has gone round every stage. An inner stage holds its layers and
their KV cache and serves no API while the group lasts (only health, readiness, metrics and its
timeline): its stage link (hydraserve.runtime.transport.link) serves the ring. A partial one
reads no tokenizer; a full one builds the standalone replica it becomes on consolidation. ``prepare`` runs
before the weights load, overlapping the fetch; ``wire`` runs after. Called by runtime/worker.py.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from typing import Protocol

from hydraserve.contracts.timeline import Timeline
from hydraserve.contracts.worker import WorkerEnvironment
from hydraserve.runtime.consolidation import Consolidator
from hydraserve.runtime.engine.engine import LLMEngine
from hydraserve.runtime.engine.factory import LoadedStage, build_engine, context_limit, load_tokenizer
from hydraserve.runtime.engine.runner import StageRunner
from hydraserve.runtime.engine.types import SamplingParams
from hydraserve.runtime.model.config import ModelConfig
from hydraserve.runtime.replica import ReplicaBuilder
from hydraserve.runtime.tokenizer import Tokenizer
from hydraserve.runtime.transport.group import GroupExecutor
from hydraserve.runtime.transport.link import StageLink, link_ring
from hydraserve.weights.model_files import ModelFiles


class Role(Protocol):
    name: str

    def prepare(self, files: ModelFiles, config: ModelConfig) -> None:
        """Work that needs no weights (runs while they are still arriving)."""
        ...

    def wire(self, loaded: LoadedStage, timeline: Timeline) -> LLMEngine | StageLink:
        """What this worker serves, from its loaded stage."""
        ...


class HeadRole:
    """Stage 0: tokenizer, scheduler, sampling, and the OpenAI + CloudEvents server."""

    name = "head"

    def __init__(self, settings: WorkerEnvironment, listener: socket.socket | None = None,
                 on_broken: Callable[[str], None] | None = None,
                 on_consolidated: Callable[[], None] | None = None) -> None:
        self._settings = settings
        self._listener = listener  # the last stage links back here (groups only)
        self._on_broken = on_broken
        self._on_consolidated = on_consolidated
        self.tokenizer: Tokenizer | None = None
        self.files: ModelFiles | None = None
        self.consolidator: Consolidator | None = None

    def prepare(self, files: ModelFiles, config: ModelConfig) -> None:
        self.files = files
        self.tokenizer = load_tokenizer(files, config)

    def wire(self, loaded: LoadedStage, timeline: Timeline) -> LLMEngine:
        assert self.tokenizer is not None, "prepare() first"
        settings = self._settings
        executor = self._link_group(loaded, timeline) if loaded.model.stage.num_stages > 1 else None
        engine = start_engine(loaded, self.tokenizer, settings, timeline, executor)
        if isinstance(executor, GroupExecutor) and settings.full:
            assert self.files is not None
            self.consolidator = Consolidator(engine, executor, self.files, timeline,
                                             on_done=self._on_consolidated or (lambda: None),
                                             handover=settings.kv_handover).start()
        return engine

    def _link_group(self, loaded: LoadedStage, timeline: Timeline) -> GroupExecutor:
        settings = self._settings
        if self._listener is None:
            raise ValueError("the head of a pipeline group needs its stage-link listener")
        runner = StageRunner(loaded.model, settings.max_batch, context_limit(loaded.config, settings.max_model_len))
        outbound, inbound = link_ring(self._listener, settings.peers[1], group_secret(settings),
                                      settings.link_timeout_s)
        executor = GroupExecutor(runner, outbound, inbound, loaded.model.stage.num_stages, on_broken=self._on_broken)
        executor.ping(settings.link_timeout_s)  # every stage serves: the group is ready
        timeline.mark("group_linked", stages=loaded.model.stage.num_stages)
        return executor


class InnerStageRole:
    """Stages 1..p-1: its layers and their KV cache, no API server. A full one (given memory for
    the whole model) also reads the tokenizer and builds the replica it becomes once the group
    consolidates (runtime/replica.py)."""

    name = "stage"

    def __init__(self, settings: WorkerEnvironment, listener: socket.socket | None = None) -> None:
        self._settings = settings
        self._listener = listener
        self._files: ModelFiles | None = None
        self._tokenizer: Tokenizer | None = None
        self.replica: ReplicaBuilder | None = None

    def prepare(self, files: ModelFiles, config: ModelConfig) -> None:
        """A partial stage never tokenizes; a full one will serve the API on its own."""
        if self._settings.full:
            self._files = files
            self._tokenizer = load_tokenizer(files, config)

    def wire(self, loaded: LoadedStage, timeline: Timeline) -> StageLink:
        """Its runner and KV cache, and the link that will serve them (``run()`` it)."""
        settings = self._settings
        stage = loaded.model.stage
        if self._listener is None:
            raise ValueError("an inner stage needs its stage-link listener")
        limit = context_limit(loaded.config, settings.max_model_len)
        runner = StageRunner(loaded.model, settings.max_batch, limit)
        timeline.mark("kv_cache_allocated", slots=settings.max_batch, max_model_len=limit)
        link = StageLink(runner, self._listener, settings.peers[(stage.index + 1) % stage.num_stages],
                         secret=group_secret(settings), link_timeout_s=settings.link_timeout_s)
        if self._tokenizer is not None and self._files is not None:
            tokenizer = self._tokenizer
            self.replica = ReplicaBuilder(link, self._files, loaded.config, timeline,
                                          lambda whole: start_engine(whole, tokenizer, settings, timeline)).start()
        return link


def group_secret(settings: WorkerEnvironment) -> bytes:
    """The group's link secret as the handshake's HMAC key: a stage without one never links."""
    if settings.link_secret is None:
        raise ValueError("a pipeline group's stage needs its group's link secret (HYDRASERVE_LINK_SECRET): "
                         "its links are never made unauthenticated")
    return settings.link_secret.get_secret_value().encode()


def start_engine(loaded: LoadedStage, tokenizer: Tokenizer, settings: WorkerEnvironment, timeline: Timeline,
                 executor: GroupExecutor | None = None) -> LLMEngine:
    """The serving engine over a whole model (or a group's executor), started and warmed up by
    one tiny forward (through every stage): the first request should not pay set-up."""
    engine = build_engine(loaded, tokenizer, max_num_seqs=settings.max_batch, max_model_len=settings.max_model_len,
                          executor=executor,
                          model_name=settings.function or settings.model_uri.rstrip("/").rsplit("/", 1)[-1])
    engine.start()
    for _ in engine.submit([0], SamplingParams(max_tokens=1, temperature=0.0)):
        pass
    timeline.mark("warmed_up")
    return engine


def role_for(settings: WorkerEnvironment, listener: socket.socket | None = None,
             on_broken: Callable[[str], None] | None = None,
             on_consolidated: Callable[[], None] | None = None) -> HeadRole | InnerStageRole:
    """The head for stage 0 (or a whole model), an inner stage otherwise."""
    if settings.is_head:
        return HeadRole(settings, listener, on_broken, on_consolidated)
    return InnerStageRole(settings, listener)
