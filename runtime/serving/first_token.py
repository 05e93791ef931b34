"""A function's first requests answered by our compact engine under vLLM's own serving layer,
while vLLM's engine starts beside it on the same shared-memory weights; then vLLM takes over.

Why: with the weights resident and a pooled process adopted, vLLM's own set-up (its engine core
and model worker forked, the model built, the KV cache allocated, a warm-up) keeps the first
token at ~2.6 s on this machine; our compact engine, built on zero-copy views of the same
segments, answers in ~0.3 s (README, "which engine gives the first token"). So a worker whose
model the compact engine runs (Llama family, OPT) and that holds the whole model serves vLLM's
OpenAI app at once over a :class:`CompactLLM`: vLLM's ``AsyncLLM`` front half (its renderer,
input and output processors: tokenization, chat templates, detokenization, stop strings,
``n > 1``) over an engine core that is our engine, in this process. What a client sees is
vLLM's API whichever engine answers. A request whose sampling our engine does not do as vLLM
does (penalties, logprobs, logit bias, min tokens, structured output, a seed: see
:meth:`CompactLLM.takes`), or that is longer than its cache, waits for vLLM's engine instead.
Once vLLM's engine is warm, the worker's HandoverEngine switches to it (requests in flight
continue there, re-prefilled after the bound; hydraserve.runtime.serving.handover) and the
compact engine stops. Built for vLLM 0.32's ``AsyncLLM`` (the attributes its methods read).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, ClassVar

from hydraserve.contracts.timeline import Moment, Timeline
from hydraserve.contracts.worker import WorkerEnvironment
from hydraserve.runtime.engine.engine import LLMEngine
from hydraserve.runtime.engine.request import RequestStream
from hydraserve.runtime.engine.types import SamplingParams as CompactParams
from hydraserve.weights.model_files import ModelFiles

log = logging.getLogger(__name__)
FIRST_ANSWER_WAIT_S = 1.0  # vLLM's engine starts once a request has its first token, or after this

# vLLM sampling parameters our engine does as vLLM does (the rest of what a request carries is
# the front half's: stop strings, detokenization, output kind, n > 1 fanned out into requests).
DONE_HERE = frozenset({"temperature", "top_p", "top_k", "max_tokens", "stop_token_ids", "ignore_eos", "n", "stop",
                       "detokenize", "skip_special_tokens", "spaces_between_special_tokens",
                       "include_stop_str_in_output", "output_kind", "stream_interval", "skip_clone",
                       "output_text_buffer_length", "_eos_token_id", "_all_stop_token_ids", "flat_logprobs",
                       "skip_reading_prefix_cache", "routed_experts_prompt_start", "trace_decode_token_ids"})


def compact_runs(settings: WorkerEnvironment, config: dict[str, Any]) -> bool:
    """Whether this worker's first requests can be the compact engine's: asked for, the whole
    model in this worker (a pipeline stage is vLLM's), read with our load format (vLLM's own
    loaders are the baselines), a model the compact engine runs, and vLLM on the CPU (the
    compact engine computes on the CPU views of the weights; on a GPU vLLM answers first: never
    measured, no GPU here)."""
    from vllm.platforms import current_platform

    from hydraserve.errors import UnsupportedModelError
    from hydraserve.runtime.model.config import ModelConfig

    whole = settings.stage is None or settings.stage.num_stages == 1
    if settings.first_token_engine != "compact" or not whole or settings.load_format != "hydraserve":
        return False
    if not current_platform.is_cpu():
        return False
    try:
        ModelConfig.from_hf(config)  # refuses what the compact engine does not run (architecture, window, rope)
    except UnsupportedModelError:
        return False
    return True


class CompactCore:
    """vLLM's engine-core client (what ``AsyncLLM`` calls ``engine_core``), answered by our
    LLMEngine in this process: requests in as vLLM's EngineCoreRequests, token ids out as its
    EngineCoreOutputs. Created on the event loop that reads it."""

    engine_ranks_managed: ClassVar[list[int]] = [0]

    def __init__(self, engine: LLMEngine) -> None:
        self._engine = engine
        self._loop = asyncio.get_running_loop()
        self._streams: dict[str, tuple[RequestStream, frozenset[int]]] = {}  # id -> stream, its stop token ids
        self._woken = asyncio.Event()
        self.resources = SimpleNamespace(engine_dead=False)

    async def get_supported_tasks_async(self) -> tuple[str, ...]:
        return ("generate",)

    async def add_request_async(self, request: Any) -> None:
        params = request.sampling_params
        stop_ids = frozenset(params.stop_token_ids or ())
        ends = stop_ids | ({params.eos_token_id} if params.eos_token_id is not None else set())
        compact = CompactParams(max_tokens=params.max_tokens, temperature=params.temperature, top_p=params.top_p,
                                top_k=max(0, params.top_k), stop_token_ids=ends)
        stream = self._engine.submit(list(request.prompt_token_ids), compact, request.request_id, on_put=self._wake)
        self._streams[request.request_id] = (stream, stop_ids)

    async def abort_requests_async(self, request_ids: list[str]) -> None:
        for request_id in request_ids:
            entry = self._streams.pop(request_id, None)
            if entry is not None:
                entry[0].cancel()

    async def get_output_async(self) -> Any:
        from vllm.v1.engine import EngineCoreOutputs

        while True:
            self._woken.clear()
            outputs = self._collect()
            if outputs:
                return EngineCoreOutputs(outputs=outputs, timestamp=time.monotonic())
            await self._woken.wait()

    def _wake(self) -> None:  # the engine's thread: a delta is waiting
        self._loop.call_soon_threadsafe(self._woken.set)

    def _collect(self) -> list[Any]:
        """Every stream's waiting tokens, one EngineCoreOutput per request that has some."""
        from vllm.v1.engine import EngineCoreOutput, FinishReason

        reasons = {"stop": FinishReason.STOP, "length": FinishReason.LENGTH, "abort": FinishReason.ABORT}
        outputs = []
        for request_id, (stream, stop_ids) in list(self._streams.items()):
            tokens: list[int] = []
            finish = None
            try:
                while (delta := stream.poll()) is not None:
                    tokens += delta.token_ids
                    finish = reasons[delta.finish_reason] if delta.finish_reason else None
            except Exception as exc:  # a failed step: the request ends as vLLM's request-level error (a 500)
                log.warning("compact engine failed request %s: %s", request_id, exc)
                finish = FinishReason.ERROR
            if not tokens and finish is None:
                continue
            stop_reason = tokens[-1] if finish == FinishReason.STOP and tokens and tokens[-1] in stop_ids else None
            outputs.append(EngineCoreOutput(request_id=request_id, new_token_ids=tokens, finish_reason=finish,
                                            stop_reason=stop_reason))
            if finish is not None:
                del self._streams[request_id]
        return outputs

    def shutdown(self, timeout: float | None = None) -> None:
        self.resources.engine_dead = True
        self._engine.shutdown(drain=False, timeout=timeout or 5)


def _build_front_half(llm: Any, vllm_config: Any, core: CompactCore) -> None:
    """``llm`` as ``AsyncLLM.__init__`` leaves it, with ``core`` for its engine core and no stats."""
    from vllm.renderers import renderer_from_config
    from vllm.v1.engine.input_processor import InputProcessor
    from vllm.v1.engine.output_processor import OutputProcessor

    llm.vllm_config = vllm_config
    llm._elastic_ep_lock = asyncio.Lock()
    llm.model_config = vllm_config.model_config
    llm.scheduler_config = vllm_config.scheduler_config
    llm.observability_config = vllm_config.observability_config
    llm.log_requests = False
    llm.log_stats = False
    llm.renderer = renderer_from_config(vllm_config)
    llm.input_processor = InputProcessor(vllm_config, llm.renderer)
    llm.admission_stats = None
    llm.output_processor = OutputProcessor(llm.renderer.tokenizer, log_stats=False,
                                           stream_interval=vllm_config.scheduler_config.stream_interval)
    llm.engine_core = core
    llm.logger_manager = None
    llm._client_count = 1
    llm.output_handler = None
    llm.profiler = None
    llm._frontend_profiler_injected = False
    llm._profile_lock = asyncio.Lock()
    llm._profile_session_guard_enabled = True
    llm._profile_session_active = False


def compact_llm_class() -> type:
    """:class:`CompactLLM` (a subclass of vLLM's AsyncLLM: defined once vLLM is imported)."""
    global _CompactLLM
    if _CompactLLM is None:
        from vllm.v1.engine.async_llm import AsyncLLM

        class CompactLLM(AsyncLLM):
            """vLLM's AsyncLLM whose engine core is our compact engine (the module docstring)."""

            def __init__(self, vllm_config: Any, engine: LLMEngine) -> None:
                _build_front_half(self, vllm_config, CompactCore(engine))
                self.context_limit = engine.max_model_len

            def takes(self, prompt: Any, params: Any) -> bool:
                """Whether our engine answers this request as vLLM's would: sampling it does the
                same way (an unseeded draw is a draw either way; a seed promises vLLM's
                sequence), and a prompt plus its budget that fits the compact cache."""
                return _takes(params, _prompt_length(prompt), self.context_limit)

        _CompactLLM = CompactLLM
    return _CompactLLM


_CompactLLM: type | None = None


def _takes(params: Any, prompt_length: int | None, context_limit: int) -> bool:
    from vllm import SamplingParams

    if not isinstance(params, SamplingParams) or prompt_length is None:
        return False
    if params.max_tokens is None or prompt_length + params.max_tokens > context_limit:
        return False
    if params.seed is not None and params.temperature >= 1e-5:
        return False
    default = _defaults()
    return all(getattr(params, name) == value for name, value in default.items())


@functools.cache
def _defaults() -> dict[str, Any]:
    """vLLM's default of every sampling parameter our engine does not do."""
    from vllm import SamplingParams

    fields = SamplingParams.__struct_fields__
    plain = SamplingParams()
    return {name: getattr(plain, name) for name in fields if name not in DONE_HERE and name != "seed"}


def _prompt_length(prompt: Any) -> int | None:
    ids = prompt.get("prompt_token_ids") if isinstance(prompt, dict) else getattr(prompt, "prompt_token_ids", None)
    return len(ids) if ids is not None else None


def load_compact_engine(settings: WorkerEnvironment, files: ModelFiles, timeline: Timeline,
                        model_max_len: int) -> tuple[LLMEngine, Any]:
    """Our engine over the whole model (its weights zero-copy views of the files' segments),
    started and warmed up, and its LoadedStage; its cache holds ``max_batch`` sequences of up to
    ``model_max_len`` tokens (vLLM's context before its engine fits it), at most the compact
    engine's usual cap. Runs in a thread (the event loop answers probes meanwhile)."""
    from hydraserve.runtime.engine.factory import DEFAULT_MAX_MODEL_LEN, load_tokenizer, start_engine
    from hydraserve.runtime.serving.args import served_model_name
    from hydraserve.runtime.startup import load_my_stage

    tokenizers: list[Any] = []
    loaded = load_my_stage(settings, files, timeline, lambda f, cfg: tokenizers.append(load_tokenizer(f, cfg)))
    try:
        engine = start_engine(loaded, tokenizers[0], max_num_seqs=settings.max_batch,
                              max_model_len=min(model_max_len, settings.max_model_len or DEFAULT_MAX_MODEL_LEN),
                              model_name=served_model_name(settings))
    except BaseException:
        loaded.source.close()
        raise
    timeline.mark(Moment.WARMED_UP)
    return engine, loaded


async def start_first_token_server(settings: WorkerEnvironment, files: ModelFiles, model_dir: Path | str,
                                   timeline: Timeline) -> tuple[Any, Any]:
    """vLLM's OpenAI app over a CompactLLM on the whole model; returns the VllmServer and the
    source of the compact engine's weights (close it once vLLM's engine serves)."""
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.usage.usage_lib import UsageContext

    from hydraserve.runtime.serving.engine import parse_engine_args, serve_app, use_engine_environment

    use_engine_environment(settings)
    args = parse_engine_args(settings, model_dir)
    vllm_config = AsyncEngineArgs.from_cli_args(args).create_engine_config(
        usage_context=UsageContext.OPENAI_API_SERVER)
    loading = Timeline()
    served_as = str(vllm_config.model_config.dtype).removeprefix("torch.")  # vLLM's choice (bf16 for fp32 on CPUs)
    engine, loaded = await asyncio.get_running_loop().run_in_executor(
        None, load_compact_engine, settings.model_copy(update={"dtype": served_as}), files, loading,
        vllm_config.model_config.max_model_len)
    timeline.absorb(loading, "compact")
    try:
        server = await serve_app(settings, args, compact_llm_class()(vllm_config, engine))
    except BaseException:
        engine.shutdown(drain=False, timeout=5)
        loaded.source.close()
        raise
    return server, loaded.source


async def hand_over_to_vllm(settings: WorkerEnvironment, model_dir: Path | str, server: Any, compact_source: Any,
                            state: Any) -> None:
    """vLLM's engine built beside the compact one once a first request has its first token (or
    after FIRST_ANSWER_WAIT_S; its moments on the timeline as ``vllm``), then the app moved onto
    it (``handed_over``) and the compact engine stopped. If vLLM's engine
    cannot start, the worker has failed: requests waiting for it get a retryable error (503)."""
    from vllm.exceptions import RetryableRequestError

    from hydraserve.runtime.serving.engine import build_engine

    building = Timeline()
    try:  # the first request's tokens before vLLM's set-up takes the cores (measured: 0.3 s later on 2)
        await asyncio.wait_for(server.engine.answered.wait(), FIRST_ANSWER_WAIT_S)
    except TimeoutError:
        pass
    try:
        engine = await build_engine(settings, model_dir, building)
        per_rank = await engine.collective_rpc("hydraserve_load_timeline", timeout=10)
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        log.exception("vLLM's engine failed to start beside the compact one")
        state.set_failed(f"vLLM's engine failed to start: {type(exc).__name__}: {exc}", exc)
        server.engine.no_successor(RetryableRequestError("the worker's vLLM engine failed to start; retry"))  # a 503
        return
    from hydraserve.contracts.timeline import TimelineEvent

    building.events += [TimelineEvent.model_validate(e) for e in per_rank[0]]
    state.timeline.absorb(building, "vllm")
    compact = server.engine.engine
    moved = await server.engine.switch(engine, settings.handover_s)
    state.timeline.mark(Moment.HANDED_OVER, to="vllm", moved=moved, deferred=server.engine.deferred)
    await asyncio.get_running_loop().run_in_executor(None, server.engine.retire, compact)
    compact_source.close()
    log.info("vLLM's engine serves; the compact engine stopped", extra={"moved": moved,
                                                                         "deferred": server.engine.deferred})
