"""The stage transport: frames (checked, never pickle), and pipeline groups over real TCP links on
loopback: a group of p = 2, 3, 4 stages gives exactly a standalone worker's tokens (greedy,
concurrent, seeded sampling) with up to p micro-batches in flight; a stage's failure fails its
step only; a broken ring or a malformed frame fails cleanly with the reason. Links are proven
both ways with the group's secret: a probe that reaches a stage's port first (speaking frames,
holding a wrong secret, replaying a recorded handshake, or saying nothing) is refused and the
real peer links after it; a stage never links to a next stage that cannot prove the secret."""

from __future__ import annotations

import json
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import pytest
import torch

from hydraserve.contracts.stage import StagePlan
from hydraserve.errors import EngineError, MissingObjectError, StageTransportError
from hydraserve.modeltools.tiny import TinySpec, make_tiny_model
from hydraserve.runtime.engine.engine import LLMEngine
from hydraserve.runtime.engine.factory import load_engine
from hydraserve.runtime.engine.runner import StageRunner, StepInput
from hydraserve.runtime.engine.types import SamplingParams
from hydraserve.runtime.model.config import ModelConfig
from hydraserve.runtime.model.loader import load_stage
from hydraserve.runtime.tokenizer import Tokenizer
from hydraserve.runtime.transport import frames, handshake
from hydraserve.runtime.transport.group import GroupExecutor
from hydraserve.runtime.transport.link import StageLink, accept, connect, link_ring, listen
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


SECRET = b"the-group's-link-secret-0123456789"  # what the launcher handed every stage of the group


def in_thread(call: Callable[[], Any]) -> Future[Any]:
    """``call()`` in a daemon thread; its result or exception in the future."""
    done: Future[Any] = Future()

    def run() -> None:
        try:
            done.set_result(call())
        except BaseException as exc:
            done.set_exception(exc)

    threading.Thread(target=run, daemon=True).start()
    return done


class Group:
    """A pipeline group of in-process stages linked by real TCP sockets on loopback;
    ``while_the_head_waits`` gets every stage's address once the head waits for its links and
    before any other stage starts linking."""

    def __init__(self, model_dir: Path, boundaries: list[int], slots: int = 4, max_len: int = 128, *,
                 while_the_head_waits: Callable[[list[str]], None] | None = None) -> None:
        cfg = ModelConfig.from_json((model_dir / "config.json").read_text())
        plan = StagePlan.from_boundaries(cfg.num_layers, boundaries)
        self.runners = [StageRunner(load_stage(cfg, LocalTensorSource(model_dir), s), slots, max_len)
                        for s in plan.stages]
        self.listeners = [listen("127.0.0.1:0") for _ in plan.stages]
        addresses = [f"127.0.0.1:{sock.getsockname()[1]}" for sock in self.listeners]
        p = len(plan.stages)
        head = in_thread(lambda: link_ring(self.listeners[0], addresses[1], SECRET, 30))
        if while_the_head_waits is not None:
            while_the_head_waits(addresses)
        self.links = [StageLink(self.runners[i], self.listeners[i], addresses[(i + 1) % p], secret=SECRET,
                                link_timeout_s=30) for i in range(1, p)]
        self.threads = [threading.Thread(target=link.run, daemon=True) for link in self.links]
        for t in self.threads:
            t.start()
        outbound, inbound = head.result(30)
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
    link = StageLink(runner, listener, f"127.0.0.1:{head.getsockname()[1]}", secret=SECRET, link_timeout_s=10)
    thread = threading.Thread(target=link.run)
    thread.start()
    out, back = link_ring(head, f"127.0.0.1:{listener.getsockname()[1]}", SECRET, 10)  # the test is its head
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
    from hydraserve.runtime.consolidation import Consolidator
    from hydraserve.weights.model_files import LocalModelFiles

    class Vanishing(LocalModelFiles):
        """The model's store loses the bytes the head still lacks."""

        def tensor_source(self, names, *, background=False):  # type: ignore[no-untyped-def]
            raise MissingObjectError("s3://models/m/model.safetensors does not exist")

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
    from hydraserve.runtime.consolidation import Consolidator
    from hydraserve.runtime.engine.factory import build_engine
    from hydraserve.runtime.replica import ReplicaBuilder
    from hydraserve.weights.model_files import LocalModelFiles

    class Vanishing(LocalModelFiles):
        def tensor_source(self, names, *, background=False):  # type: ignore[no-untyped-def]
            raise MissingObjectError("s3://models/m/model.safetensors does not exist")

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


# ------------------------------------------------------------------ links proven by the group's secret

def address_of(listener: socket.socket) -> str:
    return f"127.0.0.1:{listener.getsockname()[1]}"


def recorded_handshake() -> tuple[bytes, bytes]:
    """A real dialer's and a real acceptor's bytes of a handshake that linked (both holding
    SECRET), as a probe on the wire between them saw them: (dialer's, acceptor's)."""
    acceptor, relay = listen("127.0.0.1:0"), listen("127.0.0.1:0")
    accepted = in_thread(lambda: accept(acceptor, 10, SECRET))
    dialed = in_thread(lambda: connect(address_of(relay), 10, SECRET))
    near, _ = relay.accept()
    far = socket.create_connection(acceptor.getsockname())
    said: dict[socket.socket, bytes] = {near: b"", far: b""}
    for src, dst, n in ((near, far, handshake.HELLO_BYTES), (far, near, handshake.NONCE_BYTES + handshake.MAC_BYTES),
                        (near, far, handshake.MAC_BYTES), (far, near, len(handshake.WELCOME))):
        data = bytes(frames.recv_exactly(src, n, "recorded handshake"))
        said[src] += data
        dst.sendall(data)
    for sock in (accepted.result(10), dialed.result(10), near, far, acceptor, relay):
        sock.close()
    return said[near], said[far]


def until_closed(sock: socket.socket) -> bytes:
    """All the peer sent before it closed the connection (a reset counts as closed)."""
    got = b""
    try:
        while chunk := sock.recv(1 << 16):
            got += chunk
    except ConnectionResetError:
        pass
    return got


def probe_frames(sock: socket.socket) -> None:
    """The probe of the issue: it speaks frames at once, as a previous stage would have."""
    frames.send(sock, frames.Frame("ping", {"seq": 0}))


def probe_wrong_secret(sock: socket.socket) -> None:
    """The handshake done right, with a secret of its own."""
    mine = b"n" * handshake.NONCE_BYTES
    sock.sendall(handshake.MAGIC + bytes([handshake.VERSION]) + mine)
    theirs = bytes(frames.recv_exactly(sock, handshake.NONCE_BYTES + handshake.MAC_BYTES, "challenge"))
    sock.sendall(handshake._mac(b"a-wrong-secret-of-the-same-length!", handshake._DIALER, mine,
                                theirs[:handshake.NONCE_BYTES]))


def probe_replay(sock: socket.socket) -> None:
    """A handshake of this very group, recorded on the wire and sent again."""
    sock.sendall(recorded_handshake()[0])


def probe_silent(sock: socket.socket) -> None:
    """Connects and says nothing (its 5 s deadline is far longer than the real link takes)."""


@pytest.mark.parametrize("probe", [probe_frames, probe_wrong_secret, probe_replay, probe_silent],
                         ids=["frames", "wrong-secret", "replay", "silent"])
def test_a_probe_first_at_the_heads_port_is_refused_and_the_group_links_and_serves(
        model_dir: Path, reference: LLMEngine, probe: Callable[[socket.socket], None],
        caplog: pytest.LogCaptureFixture) -> None:
    """The probe connects to the head's inbound port while the head waits for its links and
    before the last stage links: it is refused (a silent one stays pending without holding
    anyone up), and the real last stage links after it, so the client gets the model's tokens."""
    probes: list[socket.socket] = []
    heard: list[bytes] = []

    def connect_first(addresses: list[str]) -> None:
        sock = socket.create_connection(("127.0.0.1", int(addresses[0].rsplit(":", 1)[1])), timeout=20)
        probes.append(sock)
        probe(sock)
        if probe is not probe_silent:
            heard.append(until_closed(sock))  # refused before the real stage even started

    caplog.set_level("INFO", logger="hydraserve.runtime.transport.link")
    group = Group(model_dir, [0, 2, 4], while_the_head_waits=connect_first)
    try:
        if not heard:  # the silent one: closed once the group linked
            heard.append(until_closed(probes[0]))
        assert not heard[0].endswith(handshake.WELCOME)  # never welcomed, never sent a frame
        group.engine.start()
        greedy = [SamplingParams(max_tokens=8, temperature=0.0)] * len(PROMPTS)
        assert outputs(group.engine, greedy) == outputs(reference, greedy)
        assert all(link.failed is None for link in group.links)
    finally:
        group.close()
        for sock in probes:
            sock.close()
    refusals = [r.getMessage() for r in caplog.records if "refused a stage link" in r.getMessage()]
    assert len(refusals) == 1, refusals
    assert SECRET.decode() not in caplog.text


def test_a_silent_connection_is_dropped_at_its_deadline_and_holds_no_one_up() -> None:
    listener = listen("127.0.0.1:0")
    linked = in_thread(lambda: accept(listener, 30, SECRET, handshake_s=1.5))
    silent = socket.create_connection(listener.getsockname())
    silent.settimeout(10)
    started = time.monotonic()
    assert silent.recv(1) == b""  # dropped ...
    assert 1.4 <= time.monotonic() - started < 5  # ... at its deadline,
    assert not linked.done()  # and the stage waits on for its real peer
    holding = socket.create_connection(listener.getsockname())  # another one holds the port meanwhile
    started = time.monotonic()
    real = connect(address_of(listener), 10, SECRET)
    inbound = linked.result(10)
    assert time.monotonic() - started < 1.5  # linked before the silent one's deadline: not behind it
    frames.send(real, frames.Frame("ping", {"seq": 7}))
    got = frames.recv(inbound)
    assert got is not None and got.fields == {"seq": 7}  # the link accepted is the real peer's
    for sock in (silent, holding, real, inbound, listener):
        sock.close()


def fake_next_stage_with_a_wrong_secret(listener: socket.socket) -> None:
    in_thread(lambda: accept(listener, 10, b"another-group's-secret-0123456789"))


def fake_next_stage_replaying_a_challenge(listener: socket.socket) -> None:
    _, answers = recorded_handshake()

    def replay() -> None:
        sock, _ = listener.accept()
        sock.recv(handshake.HELLO_BYTES)
        sock.sendall(answers)  # challenge and welcome of a handshake that once linked

    in_thread(replay)


@pytest.mark.parametrize("fake", [fake_next_stage_with_a_wrong_secret, fake_next_stage_replaying_a_challenge],
                         ids=["wrong-secret", "replayed-challenge"])
def test_a_stage_does_not_link_to_a_next_stage_that_cannot_prove_the_secret(
        fake: Callable[[socket.socket], None]) -> None:
    listener = listen("127.0.0.1:0")
    fake(listener)
    with pytest.raises(StageTransportError, match="does not hold this group's link secret"):
        connect(address_of(listener), 10, SECRET)
    listener.close()
