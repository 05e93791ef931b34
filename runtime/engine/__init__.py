"""Serving engine: KV cache, continuous batching scheduler, sampling, the engine loop."""
