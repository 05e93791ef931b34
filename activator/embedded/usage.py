"""What each function uses, as a serverless platform bills it and an operator sizes it: tokens in
and out, instance-seconds, device memory x seconds, cold starts and their seconds.

Tokens are read from the answers the gateway relays (OpenAI's ``usage``): a JSON answer's, and a
stream's last usage chunk. For a stream whose client did not ask for usage, the gateway asks the
function for it (``stream_options.include_usage``) and drops the usage-only chunk on the way
back, so the client gets what it asked for. Seconds accrue at the reaper's tick from the
instances that are up and the memory their workers hold (the backend says; a pipeline group
holds more than the replica it consolidates into).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any

from hydraserve.activator.embedded.metrics import GatewayMetrics

MAX_TAPPED_BYTES = 4 << 20  # a JSON answer read for its usage (larger ones go uncounted)


@dataclass
class Usage:
    """Totals of one function since it was created."""

    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    instance_seconds: float = 0.0
    memory_gb_seconds: float = 0.0
    cold_starts: int = 0
    cold_start_seconds: float = 0.0


class FunctionUsage:
    """One function's totals, kept beside its Prometheus counters."""

    def __init__(self, function: str, metrics: GatewayMetrics) -> None:
        self.function = function
        self._metrics = metrics
        self.totals = Usage()

    def tokens(self, prompt: int, completion: int) -> None:
        self.totals.requests += 1
        self.totals.prompt_tokens += prompt
        self.totals.completion_tokens += completion
        self._metrics.tokens.labels(self.function, "prompt").inc(prompt)
        self._metrics.tokens.labels(self.function, "completion").inc(completion)

    def cold_start(self, seconds: float) -> None:
        """An instance became ready ``seconds`` after its cold start began."""
        self.totals.cold_starts += 1
        self.totals.cold_start_seconds += seconds
        self._metrics.cold_start_seconds.labels(self.function).observe(seconds)

    def accrue(self, memory_gb: list[float], seconds: float) -> None:
        """``seconds`` more of the instances up now, each holding ``memory_gb[i]`` of device memory."""
        if seconds <= 0 or not memory_gb:
            return
        self.totals.instance_seconds += len(memory_gb) * seconds
        self.totals.memory_gb_seconds += sum(memory_gb) * seconds
        self._metrics.instance_seconds.labels(self.function).inc(len(memory_gb) * seconds)
        self._metrics.memory_gb_seconds.labels(self.function).inc(sum(memory_gb) * seconds)

    def as_dict(self) -> dict[str, float]:
        return {k: round(v, 3) if isinstance(v, float) else v for k, v in asdict(self.totals).items()}


def ask_for_usage(body: bytes, stream: dict[str, Any] | None) -> tuple[bytes, bool]:
    """The body to send: a stream (``stream``: its parsed body, waiting.streamed_request) that does
    not ask for usage asks for it (and True: the usage chunk is the gateway's, dropped on the way
    back)."""
    if stream is None:
        return body, False
    data = dict(stream)
    options = data.get("stream_options")
    if options is None:
        options = {}
    if not isinstance(options, dict) or options.get("include_usage") is True:
        return body, False  # asked for already, or malformed (the function says why)
    data["stream_options"] = options | {"include_usage": True}
    return json.dumps(data).encode(), True


class UsageTap:
    """Reads an answer's usage as it is relayed; ``feed`` returns the bytes to pass on."""

    def __init__(self, content_type: str, drop_usage_chunk: bool) -> None:
        self._sse = content_type == "text/event-stream"
        self._drop = drop_usage_chunk and self._sse
        self._buffer = b""
        self.usage: tuple[int, int] | None = None  # (prompt, completion)

    def feed(self, chunk: bytes) -> bytes:
        if not self._sse:
            if len(self._buffer) + len(chunk) <= MAX_TAPPED_BYTES:
                self._buffer += chunk
            return chunk
        self._buffer += chunk
        *events, self._buffer = self._buffer.split(b"\n\n")
        return b"".join(event + b"\n\n" for event in events if self._keep(event))

    def end(self) -> bytes:
        """What is left to pass on; the usage is known after this."""
        rest, self._buffer = self._buffer, b""
        if not self._sse:
            self._read_usage(rest)
            return b""
        return rest if not rest or self._keep(rest) else b""

    def _keep(self, event: bytes) -> bool:
        if not event.startswith(b"data: {"):
            return True
        data = self._read_usage(event[len(b"data: "):])
        return not (self._drop and data is not None and data.get("usage") and not data.get("choices"))

    def _read_usage(self, raw: bytes) -> dict[str, object] | None:
        try:
            data = json.loads(raw)
        except ValueError:
            return None
        if not isinstance(data, dict):
            return None
        usage = data.get("usage")
        if isinstance(usage, dict):
            prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
            if isinstance(prompt, int) and isinstance(completion, int):
                self.usage = (prompt, completion)
        return data
