"""vLLM inside a worker: its engine and its OpenAI server, built while the weights arrive.

Called by the worker (hydraserve.runtime.serving.worker) in its start-up task. Steps, each a
moment on the worker's timeline:
1. ``import_vllm`` (the "libraries" phase; nothing to do in a pooled process, which imported it).
2. ``write_model_dir``: config.json, the tokenizer files and generation_config.json, read
   through the node's loaderd (or S3, or a local directory) into a private directory vLLM reads.
3. ``start_server``: vLLM's engine arguments (hydraserve.runtime.serving.args), its engine
   (``AsyncLLM``: the engine core process forks from this one and loads the weights with our
   load format, hydraserve.runtime.serving.loader, then allocates the KV cache at the size the
   plan granted: no profiling run), warmed up by one one-token request, and its FastAPI app with
   vLLM's own state over a HandoverEngine (hydraserve.runtime.serving.handover), which our front
   (hydraserve.runtime.serving.front) serves.
The engine is built in a thread so the event loop keeps answering health probes meanwhile.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydraserve.contracts.timeline import Moment, Timeline, TimelineEvent
from hydraserve.contracts.worker import WorkerEnvironment
from hydraserve.errors import UnsupportedModelError
from hydraserve.runtime.serving.args import (
    ENGINE_KEYS,
    engine_cli_args,
    engine_environment,
    served_model_name,
)
from hydraserve.runtime.serving.handover import HandoverEngine
from hydraserve.weights.model_files import ModelFiles

log = logging.getLogger(__name__)

# What vLLM reads of a model besides its weights (tokenizers come as tokenizer.json, as
# sentencepiece tokenizer.model, or as GPT-2's vocab.json + merges.txt).
MODEL_DIR_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                   "special_tokens_map.json", "added_tokens.json", "tokenizer.model", "vocab.json", "merges.txt",
                   "chat_template.jinja", "chat_template.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")
VLLM_MODULES = ("vllm.engine.arg_utils", "vllm.v1.engine.async_llm", "vllm.entrypoints.launchers.app",
                "vllm.entrypoints.launchers.api_server.app_state", "vllm.entrypoints.launchers.cli_args",
                "vllm.entrypoints.openai.completion.protocol", "vllm.entrypoints.openai.chat_completion.protocol",
                # what building the OpenAI app imports (0.15 s of an adopted worker's start otherwise)
                "vllm.entrypoints.openai.completion.api_router", "vllm.entrypoints.openai.completion.serving",
                "vllm.entrypoints.openai.chat_completion.api_router", "vllm.entrypoints.openai.chat_completion.serving",
                "vllm.entrypoints.openai.models.api_router", "vllm.entrypoints.openai.responses.api_router",
                "vllm.entrypoints.openai.responses.serving", "vllm.entrypoints.anthropic.api_router",
                "vllm.entrypoints.generate.api_router", "vllm.entrypoints.serve.tokenize.api_router",
                "vllm.entrypoints.serve.instrumentator.metrics", "vllm.entrypoints.scale_out.factories",
                "vllm.renderers.hf", "vllm.transformers_utils.chat_templates", "vllm.v1.metrics.reader")


def import_vllm() -> None:
    """Import what the worker needs of vLLM (a no-op where a pooled process already did), then
    freeze the heap: vLLM runs full garbage collections while its engine starts (after loading
    the weights, before serving), each a walk over every object its import made (~1 s here);
    frozen objects are never walked again, in this process or the ones it forks."""
    import gc
    import importlib

    for module in VLLM_MODULES:
        importlib.import_module(module)
    _engine_arg_parser()
    gc.freeze()


def write_model_dir(files: ModelFiles, target: Path) -> Path:
    """The model's small files into ``target`` (created 0700); refuses a model without a tokenizer."""
    target.mkdir(mode=0o700, parents=True, exist_ok=True)
    found = []
    for name in MODEL_DIR_FILES:
        text = files.read_optional(name)
        if text is None:
            if name == "config.json":
                raise UnsupportedModelError(f"{files.uri} has no config.json", param="model")
            continue
        (target / name).write_text(text)
        found.append(name)
    if not any(name in found for name in TOKENIZER_FILES):
        raise UnsupportedModelError(f"{files.uri} has no tokenizer (one of {', '.join(TOKENIZER_FILES)})",
                                    param="model")
    return target


def prepare_model(settings: WorkerEnvironment, files: ModelFiles, target: Path) -> str:
    """What vLLM is given as its model, for the worker's load format: our load format reads only
    config and tokenizer from ``target`` (the weights stream in through it); vLLM's own loader
    reads a local directory as it is, or an s3:// model downloaded whole into ``target`` first
    (serverless vLLM); Run:ai's streamer is given the s3:// URI (vLLM pulls the small files)."""
    if settings.load_format == "runai_streamer":
        return settings.model_uri
    if settings.load_format == "auto":
        from hydraserve.weights.download_first import DownloadFirstModelFiles

        if not isinstance(files, DownloadFirstModelFiles):
            return settings.model_uri  # a local directory: vLLM reads it
        files.download(into=target)
    return str(write_model_dir(files, target))


@dataclass
class VllmServer:
    """vLLM's OpenAI app (served through our front) over its engine client: a HandoverEngine,
    so a consolidating group can move the app to a standalone engine underneath."""

    engine: HandoverEngine
    app: Any  # vLLM's FastAPI app, state initialised
    model_name: str

    async def load_timelines(self) -> dict[int, list[TimelineEvent]]:
        """Each pipeline stage's loading moments (rank -> events), asked of vLLM's workers."""
        per_rank = await self.engine.collective_rpc("hydraserve_load_timeline", timeout=10)
        return {rank: [TimelineEvent.model_validate(e) for e in events] for rank, events in enumerate(per_rank)}

    def shutdown(self) -> None:
        self.engine.engine.shutdown()


def use_engine_environment(settings: WorkerEnvironment) -> None:
    """This process's environment as vLLM should see it for ``settings`` (a consolidating head
    builds a standalone engine after its group's: the group's layer partition must go)."""
    wanted = engine_environment(settings)
    for key in ENGINE_KEYS - wanted.keys():
        os.environ.pop(key, None)
    os.environ.update(wanted)


def parse_engine_args(settings: WorkerEnvironment, model_dir: Path | str) -> Any:
    """vLLM's own parser over our arguments (its defaults and checks stay its own)."""
    return _engine_arg_parser().parse_args(engine_cli_args(settings, str(model_dir)))


@functools.cache
def _engine_arg_parser() -> Any:
    """vLLM's ``serve`` parser, built once (0.3 s here: a pooled process builds it before adoption)."""
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    return make_arg_parser(FlexibleArgumentParser())


async def build_engine(settings: WorkerEnvironment, model_dir: Path | str, timeline: Timeline) -> Any:
    """vLLM's engine (``AsyncLLM``) for ``settings``, warmed up (a consolidating head's second one)."""
    use_engine_environment(settings)  # its processes fork from this one now: they take this environment
    return await _started(parse_engine_args(settings, model_dir), timeline)


async def start_server(settings: WorkerEnvironment, model_dir: Path | str, timeline: Timeline) -> VllmServer:
    """vLLM's engine and OpenAI app over it."""
    use_engine_environment(settings)
    args = parse_engine_args(settings, model_dir)
    engine = await _started(args, timeline)
    if settings.stage is not None and settings.stage.num_stages > 1:  # every stage joined and loaded
        timeline.mark(Moment.GROUP_LINKED, stages=settings.stage.num_stages)
    try:
        return await serve_app(settings, args, engine)
    except BaseException:
        engine.shutdown()
        raise


async def serve_app(settings: WorkerEnvironment, args: Any, engine: Any) -> VllmServer:
    """vLLM's OpenAI app with its state over ``engine`` (vLLM's, or the compact engine's
    CompactLLM), behind a HandoverEngine."""
    from vllm.entrypoints.launchers.api_server.app_state import init_app_state
    from vllm.entrypoints.launchers.app import build_app

    handover = HandoverEngine(engine)
    tasks = await engine.get_supported_tasks()
    app = build_app(args, tasks, engine.model_config)
    await init_app_state(handover, app.state, args, tasks)  # type: ignore[arg-type]  # forwards EngineClient's
    return VllmServer(handover, app, served_model_name(settings))


async def _started(args: Any, timeline: Timeline) -> Any:
    """The engine of ``args``, its weights loaded through our load format, warmed up by one
    one-token request (the first client does not pay set-up); built in a thread."""
    from vllm import SamplingParams

    engine = await asyncio.get_running_loop().run_in_executor(None, _build_engine, args, timeline)
    try:
        async for _ in engine.generate({"prompt_token_ids": [0]}, SamplingParams(max_tokens=1),
                                       request_id=f"hydraserve-warm-up-{os.getpid()}-{time.monotonic_ns()}"):
            pass
    except BaseException:
        engine.shutdown()
        raise
    timeline.mark(Moment.WARMED_UP)
    return engine


def _build_engine(args: Any, timeline: Timeline) -> Any:
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.usage.usage_lib import UsageContext
    from vllm.v1.engine.async_llm import AsyncLLM

    engine_args = AsyncEngineArgs.from_cli_args(args)
    vllm_config = engine_args.create_engine_config(usage_context=UsageContext.OPENAI_API_SERVER)
    timeline.mark(Moment.ENGINE_CONFIGURED, pid=os.getpid())
    engine = AsyncLLM.from_vllm_config(vllm_config, usage_context=UsageContext.OPENAI_API_SERVER,
                                       enable_log_requests=False, disable_log_stats=False)
    timeline.mark(Moment.ENGINE_STARTED)  # the engine core holds the weights and its KV cache
    return engine
