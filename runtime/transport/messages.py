"""What travels the ring of a pipeline group, as frames (hydraserve.runtime.transport.frames).

The head sends ``step`` (the engine step's token ids, positions and KV slots, plus stage 0's
output activations, one tensor per forward call); each inner stage runs its layers and sends
``step`` on with its own activations; the last stage sends ``result`` (the logits) back to the
head. A stage whose model call failed sends ``error`` on instead (the head fails that step's
requests, the group keeps serving). ``ping`` goes round the ring once every stage is serving:
its return is the group's readiness. ``kv_export`` (consolidation) asks every inner stage to
append the keys and values of some KV slots, so the head gets all of them in one round trip;
``release`` tells the inner stages the group is over (they stop serving, not failed). Steps
are checked here before any layer sees them.
"""

from __future__ import annotations

from typing import Any

from hydraserve.errors import StageTransportError
from hydraserve.runtime.engine.runner import StepInput
from hydraserve.runtime.transport.frames import Frame

STEP, RESULT, ERROR, PING, KV_EXPORT, RELEASE = "step", "result", "error", "ping", "kv_export", "release"
_INT_LISTS = ("decode_tokens", "decode_positions", "decode_slots", "prefill_slots", "prefill_starts")


def step_frame(seq: int, step: StepInput, activations: list[Any]) -> Frame:
    fields = {"seq": seq, **{name: getattr(step, name) for name in _INT_LISTS},
              "prefill_tokens": step.prefill_tokens}
    return Frame(STEP, fields, list(activations))


def kv_request_of(frame: Frame, *, num_slots: int, max_len: int) -> list[tuple[int, int]]:
    """The (slot, cached length) pairs a kv_export frame asks for, checked."""
    pairs = frame.fields.get("slots")
    if not (isinstance(pairs, list) and all(
            isinstance(p, list) and len(p) == 2 and all(type(v) is int for v in p)
            and 0 <= p[0] < num_slots and 0 <= p[1] <= max_len for p in pairs)):
        raise StageTransportError("kv_export frame's slots are not [slot, length] pairs within this cache")
    return [(slot, length) for slot, length in pairs]


def seq_of(frame: Frame) -> int:
    seq = frame.fields.get("seq")
    if type(seq) is not int or seq < 0:
        raise StageTransportError(f"{frame.kind} frame without a valid seq ({seq!r})")
    return seq


def step_of(frame: Frame, *, num_slots: int, max_len: int, hidden_size: int) -> StepInput:
    """The StepInput a step frame carries, every field checked against this stage's cache."""
    f = frame.fields

    def ints(name: str, limit: int) -> list[int]:
        value = f.get(name)
        if not (isinstance(value, list) and all(type(v) is int and 0 <= v < limit for v in value)):
            raise StageTransportError(f"step frame field {name} is not a list of ints in [0, {limit})")
        return value

    step = StepInput(decode_tokens=ints("decode_tokens", 1 << 31), decode_positions=ints("decode_positions", max_len),
                     decode_slots=ints("decode_slots", num_slots), prefill_slots=ints("prefill_slots", num_slots),
                     prefill_starts=ints("prefill_starts", max_len))
    prefills = f.get("prefill_tokens")
    if not (isinstance(prefills, list) and all(isinstance(p, list) and p and all(type(t) is int for t in p)
                                               for p in prefills)):
        raise StageTransportError("step frame field prefill_tokens is not a list of token lists")
    step.prefill_tokens = prefills
    if not (len(step.decode_tokens) == len(step.decode_positions) == len(step.decode_slots)
            and len(prefills) == len(step.prefill_slots)
            and (not step.prefill_starts or len(step.prefill_starts) == len(prefills))):
        raise StageTransportError("step frame fields disagree on the batch")
    for start, tokens in zip(step.prefill_starts or [0] * len(prefills), prefills, strict=True):
        if start + len(tokens) > max_len:
            raise StageTransportError(f"step frame prefill reaches position {start + len(tokens)} > {max_len}")
    calls = step.groups()
    if len(frame.tensors) != len(calls):
        raise StageTransportError(f"step frame has {len(frame.tensors)} activations for {len(calls)} forward calls")
    for x, (tokens, _, _) in zip(frame.tensors, calls, strict=True):
        if x.dim() != 3 or tuple(x.shape) != (len(tokens), len(tokens[0]), hidden_size):
            raise StageTransportError(f"step frame activation of shape {tuple(x.shape)} does not fit its call")
    return step
