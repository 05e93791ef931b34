"""CloudEvents this platform accepts and emits (types, source, data schema).

Request events carry an OpenAI request body as data (JSON); the reply event carries the
OpenAI response body; failures reply with an error event carrying OpenAI's error shape.
Documented in docs/CLOUDEVENTS.md.
"""

from __future__ import annotations

COMPLETION_REQUEST = "dev.hydraserve.completion.request"
COMPLETION_RESPONSE = "dev.hydraserve.completion.response"
CHAT_REQUEST = "dev.hydraserve.chat.request"
CHAT_RESPONSE = "dev.hydraserve.chat.response"
ERROR = "dev.hydraserve.error"

REPLY_TYPE = {COMPLETION_REQUEST: COMPLETION_RESPONSE, CHAT_REQUEST: CHAT_RESPONSE}

SOURCE_PREFIX = "/hydraserve/functions/"  # + the function's name: its replies and errors
GATEWAY_SOURCE = "/hydraserve/gateway"  # errors about an event that names no function the gateway hosts
