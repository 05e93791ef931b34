"""OpenAI request bodies, validated with pydantic into engine SamplingParams.

Called by the OpenAI routes and the CloudEvents handler (whose event data uses the same
shapes), through hydraserve.http_json.validate: every rejection is a 400 naming the parameter.
Types are strict, as OpenAI's API is: "10" or true is not an integer, "yes" not a boolean; text
must be valid Unicode (a lone surrogate cannot be tokenized).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator

from hydraserve.runtime.engine.types import SamplingParams

MAX_STOP_STRINGS = 8
MAX_STOP_LENGTH = 256


def _unicode(value: str) -> str:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("text must be valid Unicode (it holds a lone surrogate)") from None
    return value


Text = Annotated[str, AfterValidator(_unicode)]
TokenId = Annotated[int, Field(ge=0, lt=2**31)]


class _SamplingFields(BaseModel):
    """Fields shared by completions and chat completions (OpenAI names, vLLM's top_k)."""

    model_config = ConfigDict(extra="ignore", strict=True)

    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=0)
    seed: int | None = Field(default=None, ge=0, lt=2**63)
    stop: Text | list[Text] | None = None
    stream: bool = False
    ignore_eos: bool = False  # vLLM's extension (fixed-length outputs for benchmarks)
    n: int = Field(default=1, ge=1, le=1)
    user: str | None = None

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, value: str | list[str] | None) -> str | list[str] | None:
        stops = [value] if isinstance(value, str) else (value or [])
        if len(stops) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings")
        if any(not s or len(s) > MAX_STOP_LENGTH for s in stops):
            raise ValueError(f"stop strings must be 1..{MAX_STOP_LENGTH} characters")
        return value

    def sampling_params(self, default_max_tokens: int) -> SamplingParams:
        stops = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        return SamplingParams(
            max_tokens=self.max_tokens if self.max_tokens is not None else default_max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            seed=self.seed,
            stop=tuple(stops),
            ignore_eos=self.ignore_eos,
        )


class CompletionRequest(_SamplingFields):
    """POST /v1/completions: one prompt, as text or token ids."""

    prompt: Text | list[TokenId]
    echo: bool = False
    logprobs: int | None = Field(default=None, le=0)

    @field_validator("prompt")
    @classmethod
    def _check_prompt(cls, value: str | list[int]) -> str | list[int]:
        if isinstance(value, list) and not value:
            raise ValueError("prompt token list is empty")
        return value


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    role: Literal["system", "user", "assistant", "tool"]
    content: Text


class ChatCompletionRequest(_SamplingFields):
    """POST /v1/chat/completions: a conversation rendered with the model's chat template."""

    messages: list[ChatMessage] = Field(min_length=1)

