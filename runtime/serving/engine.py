"""vLLM inside a worker: its engine and its OpenAI server, built while the weights arrive.

Called by the worker (hydraserve.runtime.serving.worker) in its start-up task. Steps, each a
moment on the worker's timeline:
1. ``import_vllm`` (the "libraries" phase; nothing to do in a pooled process, which imported it).
2. ``write_model_dir``: config.json, the tokenizer files and generation_config.json, read
   through the node's loaderd (or S3, or a local directory) into a private directory vLLM reads.
3. ``start_server``: vLLM's engine arguments (hydraserve.runtime.serving.args), its engine
   (``AsyncLLM``: the engine core process forks from this one and loads the weights with our
   load format, hydraserve.runtime.serving.loader, then allocates the KV cache at the size the
   plan granted: no profiling run) and its FastAPI app with vLLM's own state, which our front
   (hydraserve.runtime.serving.front) serves; one one-token request warms it up.
The engine is built in a thread so the event loop keeps answering health probes meanwhile.
"""

from __future__ import annotations

import asyncio
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydraserve.contracts.timeline import Timeline, TimelineEvent
from hydraserve.contracts.worker import WorkerEnvironment
from hydraserve.errors import UnsupportedModelError
from hydraserve.runtime.serving.args import engine_cli_args, served_model_name
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
                "vllm.entrypoints.openai.completion.protocol", "vllm.entrypoints.openai.chat_completion.protocol")


def import_vllm() -> None:
    """Import what the worker needs of vLLM (a no-op where a pooled process already did)."""
    import importlib

    for module in VLLM_MODULES:
        importlib.import_module(module)


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


@dataclass
class VllmServer:
    """vLLM's engine client and its OpenAI app (served through our front)."""

    engine: Any  # vllm.v1.engine.async_llm.AsyncLLM
    app: Any  # its FastAPI app, state initialised
    model_name: str

    async def load_timelines(self) -> dict[int, list[TimelineEvent]]:
        """Each pipeline stage's loading moments (rank -> events), asked of vLLM's workers."""
        per_rank = await self.engine.collective_rpc("hydraserve_load_timeline", timeout=10)
        return {rank: [TimelineEvent.model_validate(e) for e in events] for rank, events in enumerate(per_rank)}

    async def warm_up(self) -> None:
        """One one-token request through the engine: the first client does not pay set-up."""
        from vllm import SamplingParams

        async for _ in self.engine.generate({"prompt_token_ids": [0]}, SamplingParams(max_tokens=1),
                                            request_id="hydraserve-warm-up"):
            pass

    def shutdown(self) -> None:
        self.engine.shutdown()


def parse_engine_args(settings: WorkerEnvironment, model_dir: Path) -> Any:
    """vLLM's own parser over our arguments (its defaults and checks stay its own)."""
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    return make_arg_parser(FlexibleArgumentParser()).parse_args(engine_cli_args(settings, str(model_dir)))


async def start_server(settings: WorkerEnvironment, model_dir: Path, timeline: Timeline) -> VllmServer:
    """vLLM's engine (weights through our loader) and OpenAI app; ``engine_ready`` when done."""
    args = parse_engine_args(settings, model_dir)
    engine = await asyncio.get_running_loop().run_in_executor(None, _build_engine, args, timeline)
    try:
        from vllm.entrypoints.launchers.api_server.app_state import init_app_state
        from vllm.entrypoints.launchers.app import build_app

        tasks = await engine.get_supported_tasks()
        app = build_app(args, tasks, engine.model_config)
        await init_app_state(engine, app.state, args, tasks)
        server = VllmServer(engine, app, served_model_name(settings))
        await server.warm_up()
    except BaseException:
        engine.shutdown()
        raise
    timeline.mark("warmed_up")
    return server


def _build_engine(args: Any, timeline: Timeline) -> Any:
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.usage.usage_lib import UsageContext
    from vllm.v1.engine.async_llm import AsyncLLM

    engine_args = AsyncEngineArgs.from_cli_args(args)
    vllm_config = engine_args.create_engine_config(usage_context=UsageContext.OPENAI_API_SERVER)
    timeline.mark("engine_configured", pid=os.getpid())
    engine = AsyncLLM.from_vllm_config(vllm_config, usage_context=UsageContext.OPENAI_API_SERVER,
                                       enable_log_requests=False, disable_log_stats=False)
    timeline.mark("engine_started")  # the engine core holds the weights and its KV cache
    return engine
