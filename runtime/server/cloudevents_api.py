"""CloudEvents on POST /: binary or structured request in, reply event out (same mode).

Request types and data schema are in hydraserve.contracts.events. A malformed event gets a
plain 400 JSON error; a well-formed event with bad data gets an error *event* with a 4xx
status, so Knative Eventing dead-letters it instead of retrying forever.
"""

from __future__ import annotations

import logging
import uuid
from typing import Any

from cloudevents.core.bindings import http as ce_http
from cloudevents.core.formats.json import JSONFormat
from cloudevents.core.v1.event import CloudEvent
from flask import Blueprint, Response, request

from hydraserve.contracts import events
from hydraserve.errors import EngineError, HydraError, InvalidRequestError
from hydraserve.http_json import decode_json, validate
from hydraserve.http_server import client_gone
from hydraserve.runtime.server import generation
from hydraserve.runtime.server.schemas import ChatCompletionRequest, CompletionRequest
from hydraserve.runtime.server.state import RuntimeState

_FORMAT = JSONFormat()
REQUIRED_ATTRIBUTES = ("specversion", "id", "source", "type")
log = logging.getLogger(__name__)


def parse_event() -> tuple[CloudEvent, bool]:
    """The request's CloudEvent and whether it came in binary mode."""
    headers = {k.lower(): v for k, v in request.headers.items()}
    binary = any(k.startswith("ce-") for k in headers)
    if not binary and not headers.get("content-type", "").startswith("application/cloudevents+json"):
        raise InvalidRequestError("not a CloudEvent: expected ce-* headers (binary mode) or "
                                  "Content-Type application/cloudevents+json (structured mode)")
    _check_required(headers, binary)
    try:
        event = ce_http.from_http(ce_http.HTTPMessage(headers=headers, body=request.get_data()), _FORMAT)
    except Exception as exc:  # the SDK raises assorted types for malformed input
        raise InvalidRequestError(f"malformed CloudEvent: {exc}") from None
    return event, binary  # type: ignore[return-value]


def _check_required(headers: dict[str, str], binary: bool) -> None:
    """The spec's required attributes, present as sent (the SDK would make up a missing id)."""
    if binary:
        attributes: dict[str, Any] = {k[3:]: v for k, v in headers.items() if k.startswith("ce-")}
    else:
        attributes = decode_json(request.get_data())
        if not isinstance(attributes, dict):
            raise InvalidRequestError("malformed CloudEvent: the structured body is not a JSON object")
    missing = [a for a in REQUIRED_ATTRIBUTES if not isinstance(attributes.get(a), str) or not attributes[a]]
    if missing:
        raise InvalidRequestError(f"malformed CloudEvent: missing required attribute(s) {', '.join(missing)}",
                                  param=missing[0])
    if attributes["specversion"] != "1.0":
        raise InvalidRequestError(f"CloudEvents specversion {attributes['specversion']!r} is not supported (1.0 is)",
                                  param="specversion")


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
            return _respond(_reply(events.ERROR, source, event, exc.to_openai()), binary, _event_status(exc))
        except Exception as exc:  # a poison event: answered so that Eventing dead-letters it
            log.exception("event %s could not be processed", event.get_id())
            error = EngineError(f"the event could not be processed: {type(exc).__name__}")
            return _respond(_reply(events.ERROR, source, event, error.to_openai()), binary, _event_status(error))

    return bp


def _event_status(exc: HydraError) -> int:
    """The HTTP status of a failed event: retryable failures keep theirs (503: Eventing retries,
    within its retry budget); one that will fail the same way again is a 422, which Eventing
    does not retry, so the event goes to the dead-letter sink at once instead of retrying forever."""
    return exc.status if exc.status < 500 or exc.retryable else 422


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
