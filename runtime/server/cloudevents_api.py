"""CloudEvents on POST /: binary or structured request in, reply event out (same mode).

Request types and data schema are in hydraserve.contracts.events. A malformed event gets a
plain 400 JSON error; a well-formed event with bad data gets an error *event* with a 4xx
status, so Knative Eventing dead-letters it instead of retrying forever.
"""

from __future__ import annotations

import uuid
from typing import Any

from cloudevents.core.bindings import http as ce_http
from cloudevents.core.formats.json import JSONFormat
from cloudevents.core.v1.event import CloudEvent
from flask import Blueprint, Response, request

from hydraserve.contracts import events
from hydraserve.errors import HydraError, InvalidRequestError
from hydraserve.http_json import validate
from hydraserve.http_server import client_gone
from hydraserve.runtime.server import generation
from hydraserve.runtime.server.schemas import ChatCompletionRequest, CompletionRequest
from hydraserve.runtime.server.state import RuntimeState

_FORMAT = JSONFormat()


def parse_event() -> tuple[CloudEvent, bool]:
    """The request's CloudEvent and whether it came in binary mode."""
    headers = {k.lower(): v for k, v in request.headers.items()}
    binary = any(k.startswith("ce-") for k in headers)
    if not binary and not headers.get("content-type", "").startswith("application/cloudevents+json"):
        raise InvalidRequestError("not a CloudEvent: expected ce-* headers (binary mode) or "
                                  "Content-Type application/cloudevents+json (structured mode)")
    try:
        event = ce_http.from_http(ce_http.HTTPMessage(headers=headers, body=request.get_data()), _FORMAT)
    except Exception as exc:  # the SDK raises assorted types for malformed input
        raise InvalidRequestError(f"malformed CloudEvent: {exc}") from None
    return event, binary  # type: ignore[return-value]


def create_cloudevents_blueprint(state: RuntimeState, ready_wait_s: float) -> Blueprint:
    bp = Blueprint("cloudevents", __name__)

    @bp.post("/")
    def receive() -> Response:
        event, binary = parse_event()
        source = events.SOURCE_PREFIX + (state.function_name or "local")
        try:
            data = _event_data(event)
            if event.get_type() == events.CHAT_REQUEST:
                chat = validate(ChatCompletionRequest, data)
                prepared = generation.prepare_chat(state.engine(ready_wait_s), chat)
            elif event.get_type() == events.COMPLETION_REQUEST:
                completion = validate(CompletionRequest, data)
                prepared = generation.prepare_completion(state.engine(ready_wait_s), completion)
            else:
                raise InvalidRequestError(
                    f"unknown event type {event.get_type()!r}; accepted: "
                    f"{events.COMPLETION_REQUEST}, {events.CHAT_REQUEST}", param="type")
            engine = state.engine(ready_wait_s)
            result = generation.complete(engine, prepared, client_gone(request.environ))
            reply = _reply(events.REPLY_TYPE[event.get_type()], source, event, result)
            return _respond(reply, binary, 200)
        except HydraError as exc:
            return _respond(_reply(events.ERROR, source, event, exc.to_openai()), binary, exc.status)

    return bp


def _event_data(event: CloudEvent) -> dict[str, Any]:
    data = event.get_data()
    if isinstance(data, (bytes, str)):
        raise InvalidRequestError("event data must be a JSON object (datacontenttype application/json)",
                                  param="data")
    if not isinstance(data, dict):
        raise InvalidRequestError("event data must be a JSON object", param="data")
    data.pop("stream", None)  # a reply event is one message
    return data


def _reply(event_type: str, source: str, cause: CloudEvent, data: dict[str, Any]) -> CloudEvent:
    return CloudEvent(attributes={"type": event_type, "source": source, "id": uuid.uuid4().hex,
                                  "subject": cause.get_id(), "datacontenttype": "application/json"},
                      data=data)


def _respond(event: CloudEvent, binary: bool, status: int) -> Response:
    message = ce_http.to_binary(event, _FORMAT) if binary else ce_http.to_structured(event, _FORMAT)
    return Response(message.body, status=status, headers=message.headers)
