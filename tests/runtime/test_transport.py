"""The stage transport: frames (checked, never pickle), and pipeline groups over real TCP links on
loopback: a group of p = 2, 3, 4 stages gives exactly a standalone worker's tokens (greedy,
concurrent, seeded sampling) with up to p micro-batches in flight; a stage's failure fails its
step only; a broken ring or a malformed frame fails cleanly with the reason."""

from __future__ import annotations

import json
import socket
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from hydraserve.contracts.stage import StagePlan
from hydraserve.errors import EngineError, StageTransportError
from hydraserve.modeltools.tiny import TinySpec, make_tiny_model
from hydraserve.runtime.engine.engine import LLMEngine
from hydraserve.runtime.engine.factory import load_engine
from hydraserve.runtime.engine.runner import StageRunner, StepInput
from hydraserve.runtime.engine.types import SamplingParams
from hydraserve.runtime.model.config import ModelConfig
from hydraserve.runtime.model.loader import load_stage
from hydraserve.runtime.tokenizer import Tokenizer
from hydraserve.runtime.transport import frames
from hydraserve.runtime.transport.group import GroupExecutor
from hydraserve.runtime.transport.link import StageLink, accept, connect, listen
from hydraserve.runtime.transport.messages import step_frame, step_of
from hydraserve.weights.local import LocalTensorSource

PROMPTS = ["The lighthouse keeper", "Dear friend, I hope this letter finds you well.", "One", "Hello! How are you",
           "Once upon a time there was", "A B C"]


# ------------------------------------------------------------------ frames

def pair() -> tuple[socket.socket, socket.socket]:
    a, b = socket.socketpair()
    return a, b


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.int64])
def test_frames_round_trip_bytes_exactly(dtype: torch.dtype) -> None:
    a, b = pair()
    tensors = [torch.randn(2, 3, 5).to(dtype), torch.empty(0, 4).to(dtype), torch.arange(7).to(dtype)]
    frames.send(a, frames.Frame("step", {"seq": 3, "note": "x"}, tensors))
    got = frames.recv(b)
    assert got is not None and got.kind == "step" and got.fields == {"seq": 3, "note": "x"}
    assert all(g.dtype == t.dtype and torch.equal(g, t) for g, t in zip(got.tensors, tensors, strict=True))
    a.close()
    assert frames.recv(b) is None  # closed between frames: the end, not an error


def raw(header: object, payload: bytes = b"", magic: bytes = b"HSPF", length: int | None = None) -> bytes:
    body = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<4sI", magic, len(body) if length is None else length) + body + payload


@pytest.mark.parametrize(("data", "reason"), [
    (raw({"kind": "step"}, magic=b"PICK"), "not a stage-transport frame"),
    (raw({"kind": "step"}, length=(1 << 20) + 1), "exceeds"),
    (raw(b"\xff\xfe not json"), "not JSON"),
    (raw([1, 2]), "not an object with a kind"),
    (raw({"kind": "step", "tensors": [{"dtype": "Q4", "shape": [1]}]}), "unknown dtype"),
    (raw({"kind": "step", "tensors": [{"dtype": "F32", "shape": [-1]}]}), "bad shape"),
    (raw({"kind": "step", "tensors": [{"dtype": "F32", "shape": [1 << 40]}]}), "payload exceeds"),
    (raw({"kind": "step", "tensors": [{"dtype": "F32", "shape": [4]}]}, b"\0" * 7), "after 7 of the 16 B of a tensor"),
    (raw({"kind": "step"})[:-3], "of a frame header"),
    (b"HSP", "after 3 of the 8 B of a frame prefix"),
])
def test_malformed_or_truncated_frames_are_clear_errors(data: bytes, reason: str) -> None:
    a, b = pair()
    a.sendall(data)
    a.close()
    with pytest.raises(StageTransportError, match=reason):
        frames.recv(b)


def test_steps_are_checked_before_any_layer_sees_them() -> None:
    good = StepInput(decode_tokens=[5], decode_positions=[3], decode_slots=[1])
    frame = step_frame(0, good, [torch.zeros(1, 1, 8)])
    assert step_of(frame, num_slots=2, max_len=16, hidden_size=8).decode_slots == [1]
    for change, reason in [({"decode_slots": [2]}, "decode_slots"), ({"decode_positions": [16]}, "decode_positions"),
                           ({"decode_tokens": [5, 6]}, "disagree"), ({"prefill_tokens": [[]]}, "prefill_tokens"),
                           ({"decode_tokens": ["5"]}, "decode_tokens")]:
        bad = frames.Frame("step", {**frame.fields, **change}, frame.tensors)
        with pytest.raises(StageTransportError, match=reason):
            step_of(bad, num_slots=2, max_len=16, hidden_size=8)
    with pytest.raises(StageTransportError, match="does not fit"):
        step_of(frames.Frame("step", frame.fields, [torch.zeros(1, 1, 9)]), num_slots=2, max_len=16, hidden_size=8)


# ------------------------------------------------------------------ groups on loopback

@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("group") / "m", TinySpec(arch="llama", layers=4, kv_heads=2))


class Group:
    """A pipeline group of in-process stages linked by real TCP sockets on loopback."""

    def __init__(self, model_dir: Path, boundaries: list[int], slots: int = 4, max_len: int = 128) -> None:
        cfg = ModelConfig.from_json((model_dir / "config.json").read_text())
        plan = StagePlan.from_boundaries(cfg.num_layers, boundaries)
        self.runners = [StageRunner(load_stage(cfg, LocalTensorSource(model_dir), s), slots, max_len)
                        for s in plan.stages]
        self.listeners = [listen("127.0.0.1:0") for _ in plan.stages]
        addresses = [f"127.0.0.1:{sock.getsockname()[1]}" for sock in self.listeners]
        p = len(plan.stages)
        self.links = [StageLink(self.runners[i], self.listeners[i], addresses[(i + 1) % p], link_timeout_s=30)
                      for i in range(1, p)]
        self.threads = [threading.Thread(target=link.run, daemon=True) for link in self.links]
        for t in self.threads:
            t.start()
        outbound = connect(addresses[1], 30)
        inbound = accept(self.listeners[0], 30)
        self.executor = GroupExecutor(self.runners[0], outbound, inbound, p)
        self.executor.ping(30)
        self.engine = LLMEngine(self.executor, Tokenizer.from_dir(str(model_dir)), model_name="group",
                                max_model_len=max_len, vocab_size=cfg.vocab_size, max_num_seqs=slots)

    def close(self) -> None:
        self.engine.shutdown(drain=False)
        self.executor.close()
        for t in self.threads:
            t.join(10)
        self.listeners[0].close()


@pytest.fixture(scope="module")
def reference(model_dir: Path) -> Iterator[LLMEngine]:
    engine = load_engine(model_dir, max_num_seqs=4, max_model_len=128)
    yield engine
    engine.shutdown()


def outputs(engine: LLMEngine, params: list[SamplingParams]) -> list[list[int]]:
    tok = engine.tokenizer
    streams = [engine.submit(tok.encode(p), sp) for p, sp in zip(PROMPTS, params, strict=True)]
    return [s.collect().token_ids for s in streams]


@pytest.mark.parametrize("boundaries", [[0, 2, 4], [0, 1, 3, 4], [0, 1, 2, 3, 4]], ids=["p2", "p3", "p4"])
def test_a_group_gives_a_standalone_workers_tokens(model_dir: Path, reference: LLMEngine,
                                                    boundaries: list[int]) -> None:
    group = Group(model_dir, boundaries)
    try:
        group.engine.start()
        greedy = [SamplingParams(max_tokens=14, temperature=0.0)] * len(PROMPTS)
        seeded = [SamplingParams(max_tokens=10, temperature=0.9, top_p=0.9, seed=100 + i) for i in range(len(PROMPTS))]
        for params in (greedy, seeded):
            assert outputs(group.engine, params) == outputs(reference, params)  # 6 concurrent, 4 slots
        assert group.executor.max_inflight == len(boundaries) - 1
        assert all(link.steps > 0 and link.failed is None for link in group.links)
    finally:
        group.close()


def test_micro_batches_really_overlap(model_dir: Path) -> None:
    """With 4 slots over 4 requests and p = 2, steps go out two at a time."""
    group = Group(model_dir, [0, 2, 4])
    most = [0]
    real_submit = group.executor.submit

    def counting(step: StepInput):  # type: ignore[no-untyped-def]
        future = real_submit(step)
        with group.executor._lock:
            most[0] = max(most[0], len(group.executor._pending))
        return future

    group.executor.submit = counting  # type: ignore[method-assign]
    try:
        group.engine.start()
        outputs(group.engine, [SamplingParams(max_tokens=8, temperature=0.0)] * len(PROMPTS))
        assert most[0] == 2
    finally:
        group.close()


def test_a_stages_model_failure_fails_its_step_and_the_group_serves_on(model_dir: Path) -> None:
    group = Group(model_dir, [0, 2, 4])
    real_run = group.runners[1].run
    failed: list[int] = []

    def fail_once(step: StepInput, inputs: list[torch.Tensor] | None) -> list[torch.Tensor]:
        if not failed:
            failed.append(1)
            raise RuntimeError("boom on stage 1")
        return real_run(step, inputs)

    group.runners[1].run = fail_once  # type: ignore[method-assign]
    try:
        group.engine.start()
        params = SamplingParams(max_tokens=4, temperature=0.0)
        with pytest.raises(EngineError, match="stage 1: boom on stage 1"):
            group.engine.submit([1, 5, 9], params).collect()
        assert len(group.engine.submit([1, 5, 9], params).collect().token_ids) == 4
        assert group.executor.broken is None
    finally:
        group.close()


def test_a_stage_that_dies_mid_request_fails_the_request_and_breaks_the_group(model_dir: Path) -> None:
    group = Group(model_dir, [0, 1, 3, 4])
    try:
        group.engine.start()
        stream = group.engine.submit([1, 5, 9], SamplingParams(max_tokens=100, temperature=0.0))
        first = next(iter(stream))  # generating
        assert first.token_ids
        group.links[0].close()  # stage 1's links go away, as when its process is killed
        with pytest.raises(StageTransportError, match="broken"):
            stream.collect()
        assert group.executor.broken is not None
        with pytest.raises(StageTransportError, match="broken"):
            group.engine.submit([1, 2], SamplingParams(max_tokens=2)).collect()
    finally:
        group.close()


def test_a_malformed_frame_ends_the_stage_link_with_the_reason(model_dir: Path) -> None:
    cfg = ModelConfig.from_json((model_dir / "config.json").read_text())
    stage = StagePlan.from_boundaries(4, [0, 2, 4]).stages[1]
    runner = StageRunner(load_stage(cfg, LocalTensorSource(model_dir), stage), 2, 32)
    listener, head = listen("127.0.0.1:0"), listen("127.0.0.1:0")
    link = StageLink(runner, listener, f"127.0.0.1:{head.getsockname()[1]}", link_timeout_s=10)
    thread = threading.Thread(target=link.run)
    thread.start()
    out = connect(f"127.0.0.1:{listener.getsockname()[1]}", 10)
    back = accept(head, 10)
    bad = StepInput(decode_tokens=[1], decode_positions=[40], decode_slots=[0])  # position past its cache
    frames.send(out, step_frame(0, bad, [torch.zeros(1, 1, cfg.hidden_size)]))
    thread.join(10)
    assert not thread.is_alive() and link.failed is not None and "decode_positions" in link.failed
    assert frames.recv(back) is None  # it closed its links instead of guessing
    out.close()
    back.close()
    head.close()


@pytest.mark.parametrize("handover", ["recompute", "migrate"])
@pytest.mark.parametrize("boundaries", [[0, 2, 4], [0, 1, 2, 4]], ids=["p2", "p3"])
def test_consolidation_under_load_loses_nothing_and_changes_no_token(model_dir: Path, reference: LLMEngine,
                                                                     boundaries: list[int], handover: str) -> None:
    """Six streams run through the group while the head grows into the whole model and takes
    the running sequences over (their KV recomputed on the whole model, or moved from the inner
    stages): every stream finishes with a standalone worker's tokens, the executor is the whole
    model afterwards, and the inner stages were released, not failed."""
    from hydraserve.contracts.timeline import Timeline
    from hydraserve.runtime.consolidation import Consolidator
    from hydraserve.runtime.engine.runner import ModelRunner
    from hydraserve.weights.model_files import LocalModelFiles

    group = Group(model_dir, boundaries)
    timeline = Timeline()
    done = threading.Event()
    try:
        group.engine.start()
        consolidator = Consolidator(group.engine, group.executor, LocalModelFiles(model_dir), timeline,
                                    on_done=done.set, handover=handover).start()  # type: ignore[arg-type]
        params = [SamplingParams(max_tokens=40, temperature=0.0)] * 3 + [
            SamplingParams(max_tokens=40, temperature=0.8, seed=7 + i) for i in range(3)]
        tok = group.engine.tokenizer
        expected = outputs(reference, params)

        def batch() -> list[Any]:
            return [group.engine.submit(tok.encode(p), sp) for p, sp in zip(PROMPTS, params, strict=True)]

        # batches overlap until the switch is over, so some sequences always run through it
        # (one batch alone often finished first on a busy machine: nothing went over)
        running = batch()
        deadline = time.monotonic() + 30
        while not done.is_set() and time.monotonic() < deadline:
            following = batch()
            assert [s.collect().token_ids for s in running] == expected
            running = following
        assert [s.collect().token_ids for s in running] == expected
        assert done.wait(30) and consolidator.consolidated and consolidator.failed is None
        assert isinstance(group.engine.executor, ModelRunner)
        for t in group.threads:
            t.join(10)
        assert all(link.released and link.failed is None for link in group.links)
        names = [e.name for e in timeline.events]
        recomputed = ["kv_recomputed"] if handover == "recompute" else []
        assert names == ["consolidation_fetch_started", "consolidation_loaded", *recomputed, "consolidated"]
        # it really switched mid-generation: sequences were running, and their KV went over
        assert consolidator.migrated > 0 and any(link.steps > 0 for link in group.links)
        if handover == "recompute":
            event = timeline.first("kv_recomputed")
            assert event is not None and event.detail["tokens"] > 0
        after = group.engine.submit(tok.encode("Dear friend"), params[0]).collect().token_ids
        assert after == reference.submit(tok.encode("Dear friend"), params[0]).collect().token_ids
    finally:
        group.close()


def test_a_failure_during_consolidation_leaves_the_group_serving(model_dir: Path, reference: LLMEngine) -> None:
    from hydraserve.contracts.timeline import Timeline
    from hydraserve.errors import StorageError
    from hydraserve.runtime.consolidation import Consolidator
    from hydraserve.weights.model_files import LocalModelFiles

    class Vanishing(LocalModelFiles):
        """The model's store loses the bytes the head still lacks."""

        def tensor_source(self, names, *, background=False):  # type: ignore[no-untyped-def]
            raise StorageError("s3://models/m/model.safetensors does not exist", code="no_such_key")

    group = Group(model_dir, [0, 2, 4])
    timeline = Timeline()
    try:
        group.engine.start()
        consolidator = Consolidator(group.engine, group.executor, Vanishing(model_dir), timeline,
                                    on_done=lambda: None).start()
        params = [SamplingParams(max_tokens=12, temperature=0.0)] * len(PROMPTS)
        assert outputs(group.engine, params) == outputs(reference, params)
        assert consolidator.done.wait(10) and not consolidator.consolidated
        assert "does not exist" in (consolidator.failed or "")
        assert timeline.first("consolidation_failed") is not None
        assert isinstance(group.engine.executor, GroupExecutor) and group.executor.broken is None
        assert outputs(group.engine, params) == outputs(reference, params)  # still the group, still right
    finally:
        group.close()


@pytest.mark.parametrize("store", ["intact", "vanishing"])
def test_an_inner_full_stage_grows_into_a_replica_while_it_serves_the_ring(model_dir: Path, reference: LLMEngine,
                                                                           store: str) -> None:
    """Stage 1, given memory for the whole model, grows into it (its own layers reused, the rest
    read at background priority) while it serves the group; once the head consolidated and
    released the ring its engine answers as a standalone worker. A store that lost the bytes
    fails the build only: the group served on, and the stage has no replica to hand over."""
    from hydraserve.contracts.timeline import Timeline
    from hydraserve.errors import StorageError
    from hydraserve.runtime.consolidation import Consolidator
    from hydraserve.runtime.engine.factory import build_engine
    from hydraserve.runtime.replica import ReplicaBuilder
    from hydraserve.weights.model_files import LocalModelFiles

    class Vanishing(LocalModelFiles):
        def tensor_source(self, names, *, background=False):  # type: ignore[no-untyped-def]
            raise StorageError("s3://models/m/model.safetensors does not exist", code="no_such_key")

    group = Group(model_dir, [0, 2, 4])
    head_timeline, stage_timeline = Timeline(), Timeline()
    files = LocalModelFiles(model_dir) if store == "intact" else Vanishing(model_dir)
    tokenizer = Tokenizer.from_dir(str(model_dir))
    try:
        group.engine.start()
        replica = ReplicaBuilder(group.links[0], files, group.runners[1].model.config, stage_timeline,
                                 lambda whole: build_engine(whole, tokenizer, max_num_seqs=4, max_model_len=128).start(),
                                 ).start()
        consolidator = Consolidator(group.engine, group.executor, LocalModelFiles(model_dir), head_timeline,
                                    on_done=lambda: None).start()
        params = [SamplingParams(max_tokens=16, temperature=0.0)] * len(PROMPTS)
        assert outputs(group.engine, params) == outputs(reference, params)
        assert consolidator.done.wait(30) and consolidator.consolidated
        group.threads[0].join(10)
        assert group.links[0].released
        engine = replica.take_over(30)
        if store == "vanishing":
            assert engine is None and "does not exist" in (replica.failed or "")
            assert stage_timeline.first("replica_failed") is not None
            return
        assert engine is not None
        try:
            assert outputs(engine, params) == outputs(reference, params)  # the former stage 1, alone
            names = [e.name for e in stage_timeline.events]
            assert names == ["consolidation_fetch_started", "consolidation_loaded", "replica_built"]
            layers = dict(engine.executor.model.named_parameters())  # type: ignore[attr-defined]
            own = dict(group.runners[1].model.named_parameters())
            assert any(t.data_ptr() == layers[n].data_ptr() for n, t in own.items() if n in layers)  # reused, not copied
        finally:
            engine.shutdown()
    finally:
        group.close()
