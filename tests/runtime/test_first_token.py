"""The compact engine answering a worker's first requests under vLLM's own serving layer
(runtime/serving/first_token.py), then vLLM taking over.

In this process: vLLM's AsyncLLM front half (its renderer, input and output processors) over our
compact engine as its engine core, on a generated Llama, checked against Hugging Face transformers
(greedy, fp32): the token ids, vLLM's stop strings and stop token ids, an abandoned request
leaving nothing running, and which requests it takes. As a real worker process adopted from a
warm pool: the first requests answered at once through the `openai` client, requests it does not
take (logprobs) waiting for vLLM's engine, streams in flight moving onto vLLM token for token,
and a worker stopped before the hand-over leaving no process behind."""

from __future__ import annotations

import asyncio
import signal
import threading
import time
from pathlib import Path
from typing import Any

import openai
import psutil
import requests
from vllm import SamplingParams
from vllm.sampling_params import RequestOutputKind

from hydraserve.contracts.timeline import Timeline
from hydraserve.contracts.worker import WorkerEnvironment
from hydraserve.runtime.serving.first_token import compact_llm_class, compact_runs, load_compact_engine
from hydraserve.weights.model_files import open_model
from tests.conditions import running, wait_for

PROMPT = "Once upon a time"


def llm_of(model_dir: Path, max_model_len: int | None = None) -> tuple[Any, Any]:
    """A CompactLLM over the model (built as the worker builds it) and the source to close."""
    from vllm.engine.arg_utils import AsyncEngineArgs

    from hydraserve.runtime.serving.engine import parse_engine_args

    settings = WorkerEnvironment(model_uri=str(model_dir), function="fn", dtype="float32", max_batch=4,
                                 max_model_len=max_model_len)
    config = AsyncEngineArgs.from_cli_args(parse_engine_args(settings, model_dir)).create_engine_config()
    engine, loaded = load_compact_engine(settings, open_model(str(model_dir)), Timeline(),
                                         config.model_config.max_model_len)
    return compact_llm_class()(config, engine), loaded.source


def greedy_params(n: int, **kw: Any) -> SamplingParams:
    p = SamplingParams(max_tokens=n, temperature=0.0, **kw)
    p.output_kind = RequestOutputKind.DELTA
    return p


async def run(llm: Any, ids: list[int], params: SamplingParams, rid: str) -> tuple[list[int], str, Any]:
    tokens: list[int] = []
    text = ""
    last = None
    async for out in llm.generate({"type": "token", "prompt_token_ids": ids}, params, rid):
        tokens += out.outputs[0].token_ids
        text += out.outputs[0].text
        last = out.outputs[0]
    return tokens, text, last


def test_vllms_front_half_over_the_compact_engine_is_transformers_greedy(tiny_llama_dir: Path, tiny_llama_greedy: Any) -> None:
    greedy, tokenizer = tiny_llama_greedy
    ids = tokenizer(PROMPT)["input_ids"]
    want = greedy(ids, 24)

    async def scenario() -> None:
        llm, source = llm_of(tiny_llama_dir)
        try:
            several = await asyncio.gather(*(run(llm, ids, greedy_params(24, ignore_eos=True), f"r{i}") for i in range(3)))
            for tokens, text, last in several:  # batched together, each exactly as alone
                assert tokens == want and last.finish_reason == "length"
                # vLLM's detokenizer made it (it holds back a last character whose bytes are incomplete)
                assert text.rstrip("\ufffd") == tokenizer.decode(want, skip_special_tokens=True).rstrip("\ufffd")
            stop_id = want[5]
            tokens, _, last = await run(llm, ids, greedy_params(24, ignore_eos=True, stop_token_ids=[stop_id]), "s")
            assert tokens == want[:want.index(stop_id) + 1] and last.finish_reason == "stop"
            assert last.stop_reason == stop_id
            word = tokenizer.decode(want[:8], skip_special_tokens=True).split()[-1]
            _, text, last = await run(llm, ids, greedy_params(24, ignore_eos=True, stop=[word]), "w")
            assert last.finish_reason == "stop" and last.stop_reason == word and word not in text
            engine = llm.engine_core._engine
            abandoned = llm.generate({"type": "token", "prompt_token_ids": ids},
                                     greedy_params(400, ignore_eos=True), "gone")
            await abandoned.__anext__()
            await abandoned.aclose()  # the client left: vLLM aborts it in its engine core, ours
            deadline = time.monotonic() + 5
            while engine.num_active() and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            assert engine.num_active() == 0
        finally:
            llm.shutdown()
            source.close()

    asyncio.run(scenario())


def test_it_takes_only_what_it_does_as_vllm_does(tiny_llama_dir: Path) -> None:
    async def scenario() -> None:
        llm, source = llm_of(tiny_llama_dir, max_model_len=64)
        try:
            prompt = {"type": "token", "prompt_token_ids": [1, 2, 3]}
            assert llm.takes(prompt, SamplingParams(max_tokens=8, temperature=0.0))
            assert llm.takes(prompt, SamplingParams(max_tokens=8, temperature=0.8, top_p=0.9, top_k=5, n=2,
                                                    stop=["x"], stop_token_ids=[7]))
            assert llm.takes(prompt, SamplingParams(max_tokens=8, temperature=0.0, seed=3))  # greedy: a seed is moot
            for refused in ({"presence_penalty": 0.5}, {"frequency_penalty": 0.5}, {"repetition_penalty": 1.2},
                            {"logprobs": 1}, {"prompt_logprobs": 1}, {"logit_bias": {5: -100.0}}, {"min_tokens": 2},
                            {"min_p": 0.1, "temperature": 0.8}, {"seed": 3, "temperature": 0.8}, {"allowed_token_ids": [1, 2]},
                            {"max_tokens": 62}):
                sp = SamplingParams(**{"max_tokens": 8, "temperature": 0.0, **refused})  # type: ignore[arg-type]
                assert not llm.takes(prompt, sp), refused
            assert not llm.takes({"prompt": "text, not tokens"}, SamplingParams(max_tokens=8))
        finally:
            llm.shutdown()
            source.close()

    asyncio.run(scenario())


def test_which_workers_start_on_the_compact_engine(tiny_llama_dir: Path, tiny_opt_dir: Path) -> None:
    from hydraserve.contracts.stage import StageSpec

    def config(model: Path) -> dict[str, Any]:
        return dict(open_model(str(model)).config())

    llama = WorkerEnvironment(model_uri=str(tiny_llama_dir))
    assert compact_runs(llama, config(tiny_llama_dir)) and compact_runs(llama, config(tiny_opt_dir))
    assert not compact_runs(llama.model_copy(update={"first_token_engine": "vllm"}), config(tiny_llama_dir))
    assert not compact_runs(llama.model_copy(update={"load_format": "auto"}), config(tiny_llama_dir))
    assert not compact_runs(llama, {**config(tiny_llama_dir), "model_type": "gemma2"})
    assert not compact_runs(llama, {**config(tiny_llama_dir), "hidden_act": "gelu"})
    stage = StageSpec(index=0, num_stages=2, layer_start=0, layer_end=1, num_layers=2)
    group = llama.model_copy(update={"stage": stage, "peers": ["a:1", "b:2"], "transport_port": 1})
    assert not compact_runs(group, config(tiny_llama_dir))


# ---- a real worker process, adopted from the warm pool ----

def timeline_of(worker: Any) -> list[dict[str, Any]]:
    return list(requests.get(worker.url + "/v1/hydraserve/timeline", timeout=5).json()["events"])


def handed_over(worker: Any, timeout_s: float = 120) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        done = [e for e in timeline_of(worker) if e["name"] == "handed_over"]
        if done:
            return done[0]
        time.sleep(0.1)
    raise AssertionError("vLLM never took over")


def test_first_requests_from_the_compact_engine_then_vllm_takes_over_with_streams_in_flight(
        vllm_pool: Any, tiny_llama_dir: Path, tiny_llama_greedy: Any) -> None:
    greedy, tokenizer = tiny_llama_greedy
    ids = tokenizer(PROMPT)["input_ids"]
    messages = [{"role": "user", "content": "Tell me a story"}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    chat_ids = tokenizer(text, add_special_tokens=False)["input_ids"]  # the template as written: no extra BOS
    want, want_chat = greedy(ids, 64), greedy(chat_ids, 5)[:5]
    w = vllm_pool.launch(str(tiny_llama_dir), first_token_engine="compact", handover_s=0.0)
    try:
        w.wait_ready(120)
        client = openai.OpenAI(base_url=w.url + "/v1", api_key="unused", max_retries=0)
        streamed: list[list[int]] = []
        logprobs: list[Any] = []
        stop = threading.Event()

        def stream_until_handed_over() -> None:
            while not stop.is_set():
                chunks = client.completions.create(model="fn", prompt=PROMPT, max_tokens=64, temperature=0,
                                                   stream=True, extra_body={"ignore_eos": True})
                streamed.append([t for c in chunks for t in (c.choices[0].model_extra or {}).get("token_ids") or []
                                 if c.choices])

        def ask_for_logprobs() -> None:  # our engine has none: this one waits for vLLM's
            answer = client.completions.create(model="fn", prompt=PROMPT, max_tokens=3, temperature=0, logprobs=2)
            logprobs.append(answer.choices[0].logprobs)

        threads = [threading.Thread(target=stream_until_handed_over) for _ in range(3)]
        threads.append(threading.Thread(target=ask_for_logprobs))
        for thread in threads:
            thread.start()
        first = client.completions.create(model="fn", prompt=PROMPT, max_tokens=12, temperature=0,
                                          extra_body={"ignore_eos": True})
        chat = client.chat.completions.create(model="fn", messages=messages, max_completion_tokens=5,  # type: ignore[arg-type]
                                              temperature=0)
        answered = time.time()
        assert first.choices[0].model_extra["token_ids"] == want[:12]  # type: ignore[index]
        assert chat.model_extra is not None and chat.model_extra["prompt_token_ids"] == chat_ids
        assert chat.choices[0].model_extra["token_ids"] == want_chat  # type: ignore[index]
        over = handed_over(w)
        stop.set()
        for thread in threads:
            thread.join(60)
        ready = next(e for e in timeline_of(w) if e["name"] == "engine_ready")
        assert ready["detail"]["first_token_engine"] == "compact"
        assert over["at"] > answered  # the two answers above were the compact engine's
        assert logprobs and logprobs[0] is not None and over["detail"]["deferred"] >= 1, over
        assert over["detail"]["moved"] >= 1, over
        assert streamed and all(tokens == want for tokens in streamed)  # moved ones too: token for token
        family = [w.proc.pid, *(c.pid for c in psutil.Process(w.proc.pid).children(recursive=True))]
        assert len(family) >= 3  # vLLM's engine core and model worker now serve
        again = client.completions.create(model="fn", prompt=PROMPT, max_tokens=12, temperature=0,
                                          extra_body={"ignore_eos": True})
        assert again.choices[0].model_extra["token_ids"] == want[:12]  # type: ignore[index]
        components = {e["component"] for e in timeline_of(w)}
        assert {"compact", "vllm"} <= components
    finally:
        w.stop(grace_s=10)


def test_a_worker_stopped_before_vllm_takes_over_leaves_no_process(vllm_pool: Any, tiny_llama_dir: Path) -> None:
    w = vllm_pool.launch(str(tiny_llama_dir), first_token_engine="compact")
    w.wait_ready(120)
    assert not [e for e in timeline_of(w) if e["name"] == "handed_over"]
    assert wait_for(lambda: psutil.Process(w.proc.pid).children(), 30)  # vLLM's engine is starting
    family = [w.proc.pid, *(c.pid for c in psutil.Process(w.proc.pid).children(recursive=True))]
    w.proc.send_signal(signal.SIGTERM)
    assert w.proc.wait(30) == 0

    def left() -> list[int]:  # the family, and any process it started meanwhile
        return running([*family, *(p.info["pid"] for p in psutil.process_iter(["ppid", "pid"])
                                   if p.info["ppid"] in family)])
    assert wait_for(lambda: not left(), 5), left()
    w.stop(grace_s=1)
