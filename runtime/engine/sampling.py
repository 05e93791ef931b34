"""Token sampling: greedy, temperature, top-k, top-p, with a per-request torch.Generator.

Called by the engine once per step with the logits of every scheduled request. Each row is
sampled with its own generator, so a request with a seed produces the same tokens whatever
else is in the batch. A temperature below ``GREEDY_BELOW`` is greedy, as in vLLM: dividing by
1e-38 made the logits infinite and the probabilities NaN, and the failed draw failed every
request batched with it (issue 22 item 1).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from hydraserve.runtime.engine.types import SamplingParams

GREEDY_BELOW = 1e-5  # vLLM's _SAMPLING_EPS


def is_greedy(params: SamplingParams) -> bool:
    return params.temperature < GREEDY_BELOW


def make_generator(seed: int | None) -> torch.Generator:
    """A CPU generator seeded with ``seed``, or with fresh entropy when None."""
    generator = torch.Generator()
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed % (2**64))
    return generator


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Mask (to -inf) tokens outside top-k, then outside the top-p nucleus; logits [V] float32."""
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        outside = (torch.cumsum(probs, dim=-1) - probs) > top_p  # always keeps the first
        logits = logits.masked_fill(torch.zeros_like(outside).scatter(0, order, outside), float("-inf"))
    return logits


def sample_row(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> int:
    if is_greedy(params):
        return int(torch.argmax(logits))
    scaled = filter_logits(logits.float() / params.temperature, params.top_k, params.top_p)
    probs = torch.softmax(scaled, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))


def sample(logits: torch.Tensor, params: Sequence[SamplingParams],
           generators: Sequence[torch.Generator]) -> list[int]:
    """One token per row of ``logits`` [B, V]."""
    greedy = [i for i, p in enumerate(params) if is_greedy(p)]
    out = [0] * len(params)
    if greedy:
        for i, token in zip(greedy, torch.argmax(logits[greedy], dim=-1).tolist(), strict=True):
            out[i] = int(token)
    for i, p in enumerate(params):
        if not is_greedy(p):
            out[i] = sample_row(logits[i], p, generators[i])
    return out
