"""The function's HTTP face: OpenAI-compatible API, CloudEvents, health and readiness."""
