"""vLLM as the serving engine: our load format, the fixes we carry, the worker around vLLM's server."""
