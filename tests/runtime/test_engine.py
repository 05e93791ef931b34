"""LLMEngine behaviour on a tiny real model: continuous batching, sampling, stops, limits, errors."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from hydraserve.errors import ContextLengthError, InvalidRequestError, TemporaryError
from hydraserve.runtime.engine.engine import EngineError, LLMEngine
from hydraserve.runtime.engine.factory import load_engine, load_model, load_tokenizer
from hydraserve.runtime.engine.runner import ModelRunner, StepInput
from hydraserve.runtime.engine.sampling import filter_logits
from hydraserve.runtime.engine.types import SamplingParams
from hydraserve.runtime.tokenizer import Tokenizer
from hydraserve.weights.model_files import LocalModelFiles

PROMPTS = ["The", "Hello! How are you today? I am fine", "One, two, three, four, five, six, seven",
           "Dear friend, I hope this letter finds you well. The garden is full", "A", "The quick brown"]
GREEDY = SamplingParams(max_tokens=20, temperature=0.0)


@pytest.fixture(params=["llama", "opt"])
def engine(request: pytest.FixtureRequest, tiny_llama_dir: Path, tiny_opt_dir: Path) -> Iterator[LLMEngine]:
    model_dir = tiny_llama_dir if request.param == "llama" else tiny_opt_dir
    eng = load_engine(model_dir, max_num_seqs=4)
    yield eng
    eng.shutdown(drain=False)


def _alone(model_dir: Path, prompt_ids: list[int], params: SamplingParams) -> list[int]:
    eng = load_engine(model_dir, max_num_seqs=1)
    try:
        return eng.submit(prompt_ids, params).collect().token_ids
    finally:
        eng.shutdown()


def test_concurrent_requests_match_each_run_alone(tiny_llama_dir: Path) -> None:
    eng = load_engine(tiny_llama_dir, max_num_seqs=4, start=False)
    prompts = [eng.tokenizer.encode(p) for p in PROMPTS]
    streams = [eng.submit(ids, GREEDY) for ids in prompts]  # 6 requests, 4 slots: 2 must wait
    assert eng.num_active() == 6
    eng.start()
    results = [s.collect() for s in streams]
    eng.shutdown()
    generated = sum(len(r.token_ids) for r in results)
    assert eng.steps < generated / 2  # requests really shared steps
    for ids, result in zip(prompts, results, strict=True):
        assert result.token_ids == _alone(tiny_llama_dir, ids, GREEDY)


def test_request_joins_a_running_batch(tiny_opt_dir: Path) -> None:
    eng = load_engine(tiny_opt_dir, max_num_seqs=4)
    try:
        first_ids = eng.tokenizer.encode(PROMPTS[1])
        first = iter(eng.submit(first_ids, SamplingParams(max_tokens=200, temperature=0.0)))
        head = [next(first), next(first), next(first)]
        second_ids = eng.tokenizer.encode(PROMPTS[3])
        second = eng.submit(second_ids, GREEDY).collect()
        first_tokens = [t for d in head for t in d.token_ids] + [t for d in first for t in d.token_ids]
    finally:
        eng.shutdown()
    assert first_tokens == _alone(tiny_opt_dir, first_ids, SamplingParams(max_tokens=200, temperature=0.0))
    assert second.token_ids == _alone(tiny_opt_dir, second_ids, GREEDY)


def test_seed_makes_sampling_reproducible_even_in_a_batch(engine: LLMEngine) -> None:
    ids = engine.tokenizer.encode(PROMPTS[2])
    params = SamplingParams(max_tokens=24, temperature=1.0, top_p=0.95, seed=1234)
    alone = engine.submit(ids, params).collect().token_ids
    noise = [engine.submit(engine.tokenizer.encode(p), SamplingParams(max_tokens=24, temperature=1.0))
             for p in PROMPTS[:3]]
    batched = engine.submit(ids, params).collect().token_ids
    other_seed = engine.submit(ids, SamplingParams(max_tokens=24, temperature=1.0, top_p=0.95, seed=99))
    for stream in noise:
        stream.collect()
    assert batched == alone
    assert other_seed.collect().token_ids != alone
    greedy = engine.submit(ids, SamplingParams(max_tokens=24, temperature=0.0)).collect().token_ids
    assert alone != greedy  # sampling at temperature 1 on a random model is not greedy


def test_top_k_1_and_tiny_top_p_reduce_to_greedy(engine: LLMEngine) -> None:
    ids = engine.tokenizer.encode(PROMPTS[0])
    greedy = engine.submit(ids, SamplingParams(max_tokens=16, temperature=0.0)).collect().token_ids
    top_k = engine.submit(ids, SamplingParams(max_tokens=16, temperature=1.5, top_k=1, seed=1)).collect()
    top_p = engine.submit(ids, SamplingParams(max_tokens=16, temperature=1.5, top_p=1e-6, seed=2)).collect()
    assert top_k.token_ids == greedy
    assert top_p.token_ids == greedy


def test_a_vanishing_temperature_is_greedy_and_harms_no_request_batched_with_it(engine: LLMEngine) -> None:
    """Issue 22 item 1: temperature 1e-38 passed validation, made the probabilities NaN and
    failed every request of its batch; now it is greedy, as in vLLM, and the others are served."""
    ids = engine.tokenizer.encode(PROMPTS[1])
    greedy = engine.submit(ids, SamplingParams(max_tokens=12, temperature=0.0)).collect().token_ids
    others = [engine.submit(engine.tokenizer.encode(p), SamplingParams(max_tokens=12, temperature=1.0, seed=7))
              for p in PROMPTS[:3]]
    tiny = [engine.submit(ids, SamplingParams(max_tokens=12, temperature=t)) for t in (1e-38, 5e-324, 1e-6)]
    assert [s.collect().token_ids for s in tiny] == [greedy] * 3
    assert all(len(s.collect().token_ids) == 12 for s in others)


def test_filter_logits_keeps_top_k_and_nucleus() -> None:
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    assert torch.isfinite(filter_logits(logits, top_k=2, top_p=1.0)).tolist() == [True, True, False, False]
    assert torch.isfinite(filter_logits(logits, top_k=0, top_p=0.7)).tolist() == [True, True, False, False]
    assert torch.isfinite(filter_logits(logits, top_k=0, top_p=0.85)).tolist() == [True, True, True, False]


def test_text_streams_incrementally_and_equals_decode(engine: LLMEngine) -> None:
    ids = engine.tokenizer.encode(PROMPTS[3])
    deltas = list(engine.submit(ids, SamplingParams(max_tokens=30, temperature=0.0)))
    tokens = [t for d in deltas for t in d.token_ids]
    assert len(deltas) == 30 and all(len(d.token_ids) == 1 for d in deltas)
    assert "".join(d.text for d in deltas) == engine.tokenizer.decode(tokens)
    assert [d.finish_reason for d in deltas] == [None] * 29 + ["length"]


def test_stop_string_is_trimmed_and_never_streamed(engine: LLMEngine) -> None:
    ids = engine.tokenizer.encode(PROMPTS[1])
    full = engine.submit(ids, SamplingParams(max_tokens=30, temperature=0.0)).collect()
    assert len(full.text) > 12
    stop = full.text[8:11]
    expected = full.text[:full.text.find(stop)]
    deltas = list(engine.submit(ids, SamplingParams(max_tokens=30, temperature=0.0, stop=("\x00never", stop))))
    streamed = "".join(d.text for d in deltas)
    assert streamed == expected
    assert deltas[-1].finish_reason == "stop"
    assert len([t for d in deltas for t in d.token_ids]) < 30


def test_max_tokens_and_eos_finish(tiny_llama_dir: Path) -> None:
    files = LocalModelFiles(tiny_llama_dir)
    loaded = load_model(files)
    cfg, model, tokenizer = loaded.config, loaded.model, load_tokenizer(files, loaded.config)
    ids = tokenizer.encode(PROMPTS[2])

    def run(tok: Tokenizer, max_tokens: int, ignore_eos: bool = False) -> tuple[list[int], str | None]:
        eng = LLMEngine(ModelRunner(model, 2, 128), tok, model_name="tiny", max_model_len=128,
                        vocab_size=cfg.vocab_size).start()
        try:
            params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=ignore_eos)
            result = eng.submit(ids, params).collect()
            return result.token_ids, result.finish_reason
        finally:
            eng.shutdown()

    tokens, reason = run(tokenizer, 7)
    assert len(tokens) == 7 and reason == "length"
    # make the 4th greedy token an EOS id: generation must stop right there
    eos_tok = Tokenizer((tiny_llama_dir / "tokenizer.json").read_text(), eos_token_ids=[tokens[3]])
    stopped, reason = run(eos_tok, 7)
    assert stopped == tokens[:4] and reason == "stop"
    assert run(eos_tok, 7, ignore_eos=True) == (tokens, "length")  # vLLM's ignore_eos: all 7


def test_context_length_and_invalid_params(engine: LLMEngine) -> None:
    ids = engine.tokenizer.encode(PROMPTS[0])
    with pytest.raises(ContextLengthError) as err:
        engine.submit(ids, SamplingParams(max_tokens=engine.max_model_len))
    assert err.value.code == "context_length_exceeded" and err.value.status == 400
    engine.submit(ids, SamplingParams(max_tokens=engine.max_model_len - len(ids), temperature=0)).cancel()
    bad = [
        (SamplingParams(max_tokens=0), "max_tokens"),
        (SamplingParams(temperature=-0.1), "temperature"),
        (SamplingParams(top_p=0.0), "top_p"),
        (SamplingParams(top_p=1.5), "top_p"),
        (SamplingParams(top_k=-1), "top_k"),
        (SamplingParams(seed=-3), "seed"),
        (SamplingParams(stop=("",)), "stop"),
    ]
    for params, param in bad:
        with pytest.raises(InvalidRequestError) as err:
            engine.submit(ids, params)
        assert err.value.param == param
    for prompt in ([], [engine.vocab_size], [-1]):
        with pytest.raises(InvalidRequestError) as err:
            engine.submit(prompt, GREEDY)
        assert err.value.param == "prompt"


def test_cancel_aborts_and_frees_the_slot(engine: LLMEngine) -> None:
    stream = engine.submit(engine.tokenizer.encode(PROMPTS[0]), SamplingParams(max_tokens=300, temperature=0))
    iterator = iter(stream)
    next(iterator)
    stream.cancel()
    rest = list(iterator)
    assert rest[-1].finish_reason == "abort"
    assert sum(len(d.token_ids) for d in rest) < 299
    assert engine.num_active() == 0


def test_shutdown_drains_then_refuses(tiny_llama_dir: Path) -> None:
    eng = load_engine(tiny_llama_dir, max_num_seqs=2)
    streams = [eng.submit(eng.tokenizer.encode(p), SamplingParams(max_tokens=12, temperature=0))
               for p in PROMPTS[:3]]
    eng.shutdown(drain=True, timeout=30)
    assert eng.aborted_at_shutdown == 0
    assert [s.collect().finish_reason for s in streams] == ["length"] * 3
    with pytest.raises(TemporaryError):
        eng.submit([1, 2, 3], GREEDY)


def test_shutdown_without_drain_aborts(tiny_llama_dir: Path) -> None:
    eng = load_engine(tiny_llama_dir, max_num_seqs=1, start=False)
    streams = [eng.submit([1, 5, 6], SamplingParams(max_tokens=50, temperature=0)) for _ in range(2)]
    eng.shutdown(drain=False)
    assert eng.aborted_at_shutdown == 2
    assert [s.collect().finish_reason for s in streams] == ["abort", "abort"]


def test_submit_is_thread_safe(tiny_opt_dir: Path) -> None:
    eng = load_engine(tiny_opt_dir, max_num_seqs=8)
    ids = eng.tokenizer.encode(PROMPTS[2])
    results: list[list[int]] = []
    lock = threading.Lock()

    def worker() -> None:
        tokens = eng.submit(ids, SamplingParams(max_tokens=10, temperature=0)).collect().token_ids
        with lock:
            results.append(tokens)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    eng.shutdown()
    assert len(results) == 8 and all(r == results[0] for r in results)


class FailingOnceExecutor:
    """Wraps a real runner and fails the first step it sees (a model bug or OOM mid-step)."""

    def __init__(self, inner: ModelRunner) -> None:
        self.inner = inner
        self.failed = False

    def execute(self, step: StepInput) -> torch.Tensor:
        if not self.failed:
            self.failed = True
            raise RuntimeError("boom")
        return self.inner.execute(step)


def test_failed_step_errors_its_requests_and_engine_keeps_serving(tiny_llama_dir: Path) -> None:
    files = LocalModelFiles(tiny_llama_dir)
    loaded = load_model(files)
    cfg, model, tokenizer = loaded.config, loaded.model, load_tokenizer(files, loaded.config)
    eng = LLMEngine(FailingOnceExecutor(ModelRunner(model, 2, 64)), tokenizer, model_name="tiny",
                    max_model_len=64, vocab_size=cfg.vocab_size).start()
    try:
        with pytest.raises(EngineError, match="boom"):
            eng.submit([1, 5, 9], GREEDY).collect()
        assert eng.num_active() == 0
        assert len(eng.submit([1, 5, 9], GREEDY).collect().token_ids) == GREEDY.max_tokens
    finally:
        eng.shutdown()


def test_long_prompts_are_prefilled_in_chunks_without_changing_tokens(tiny_llama_dir: Path) -> None:
    files = LocalModelFiles(tiny_llama_dir)
    loaded = load_model(files)
    cfg, model, tokenizer = loaded.config, loaded.model, load_tokenizer(files, loaded.config)
    eng = LLMEngine(ModelRunner(model, 4, 256), tokenizer, model_name="tiny", max_model_len=256,
                    vocab_size=cfg.vocab_size, max_num_seqs=4, max_prefill_tokens=7)
    long_ids = tokenizer.encode(" ".join(PROMPTS))
    short_ids = tokenizer.encode(PROMPTS[0])
    assert len(long_ids) > 40
    params = SamplingParams(max_tokens=6, temperature=0.0)
    short = eng.submit(short_ids, params)
    eng.step()  # the short prompt is prefilled (7-token budget) and gets its first token
    long = eng.submit(long_ids, params)
    for _ in range(4):  # each step: one decode of the short request + a 6-7 token chunk of the long
        eng.step()
    short_tokens = [t for d in iter(short.poll, None) for t in d.token_ids]
    assert len(short_tokens) == 5  # decoding went on while the long prompt was being prefilled
    assert long.poll() is None  # 4 chunks of <= 7 tokens do not cover > 40 prompt tokens
    eng.start()
    short_tokens += short.collect().token_ids
    got_long = long.collect()
    eng.shutdown()
    assert short_tokens == _alone(tiny_llama_dir, short_ids, params)
    assert got_long.token_ids == _alone(tiny_llama_dir, long_ids, params)
