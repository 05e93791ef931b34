"""Request checks done at submit time, before anything is queued.

Called by LLMEngine.submit. Bad parameters raise InvalidRequestError naming the parameter;
a prompt that cannot fit with its max_tokens raises ContextLengthError.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from hydraserve.errors import ContextLengthError, InvalidRequestError
from hydraserve.runtime.engine.types import SamplingParams


def validate_request(prompt_token_ids: Sequence[int], params: SamplingParams, *, vocab_size: int,
                     max_model_len: int) -> None:
    if not prompt_token_ids:
        raise InvalidRequestError("prompt is empty", param="prompt")
    if any(not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab_size for t in prompt_token_ids):
        raise InvalidRequestError(f"prompt token ids must be integers in [0, {vocab_size})", param="prompt")
    if not isinstance(params.max_tokens, int) or params.max_tokens < 1:
        raise InvalidRequestError("max_tokens must be a positive integer", param="max_tokens")
    if not math.isfinite(params.temperature) or params.temperature < 0:
        raise InvalidRequestError("temperature must be >= 0", param="temperature")
    if not (math.isfinite(params.top_p) and 0.0 < params.top_p <= 1.0):
        raise InvalidRequestError("top_p must be in (0, 1]", param="top_p")
    if not isinstance(params.top_k, int) or params.top_k < 0:
        raise InvalidRequestError("top_k must be >= 0 (0 disables it)", param="top_k")
    if params.seed is not None and (not isinstance(params.seed, int) or params.seed < 0):
        raise InvalidRequestError("seed must be a non-negative integer", param="seed")
    if any(not isinstance(s, str) or not s for s in params.stop):
        raise InvalidRequestError("stop strings must be non-empty strings", param="stop")
    total = len(prompt_token_ids) + params.max_tokens
    if total > max_model_len:
        raise ContextLengthError(
            f"This model's maximum context length is {max_model_len} tokens. However, you requested "
            f"{total} tokens ({len(prompt_token_ids)} in the prompt, {params.max_tokens} for the "
            f"completion). Please reduce the prompt or max_tokens.")
