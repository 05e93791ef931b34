"""CloudEvents in and out, framework-free: parse a request event, build reply and error events.

Used by the worker's front (hydraserve.runtime.serving.front) on ``POST /``. Types and the data
schema are in hydraserve.contracts.events; docs/CLOUDEVENTS.md says what a client sees.
Required attributes are checked as sent (the SDK would make up a missing id).
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from typing import Any

from cloudevents.core.bindings import http as ce_http
from cloudevents.core.formats.json import JSONFormat
from cloudevents.core.v1.event import CloudEvent

from hydraserve.contracts import events
from hydraserve.errors import HydraError, InvalidRequestError
from hydraserve.http_json import decode_json

_FORMAT = JSONFormat()
REQUIRED_ATTRIBUTES = ("specversion", "id", "source", "type")
ROUTE_OF_TYPE = {events.COMPLETION_REQUEST: "/v1/completions", events.CHAT_REQUEST: "/v1/chat/completions"}


def parse_event(headers: Mapping[str, str], body: bytes) -> tuple[CloudEvent, bool]:
    """The request's CloudEvent and whether it came in binary mode (``headers`` lower-cased)."""
    binary = any(k.startswith("ce-") for k in headers)
    if not binary and not headers.get("content-type", "").startswith("application/cloudevents+json"):
        raise InvalidRequestError("not a CloudEvent: expected ce-* headers (binary mode) or "
                                  "Content-Type application/cloudevents+json (structured mode)")
    _check_required(headers, body, binary)
    try:
        event = ce_http.from_http(ce_http.HTTPMessage(headers=dict(headers), body=body), _FORMAT)
    except Exception as exc:  # the SDK raises assorted types for malformed input
        raise InvalidRequestError(f"malformed CloudEvent: {exc}") from None
    return event, binary  # type: ignore[return-value]


def _check_required(headers: Mapping[str, str], body: bytes, binary: bool) -> None:
    if binary:
        attributes: dict[str, Any] = {k[3:]: v for k, v in headers.items() if k.startswith("ce-")}
    else:
        attributes = decode_json(body)
        if not isinstance(attributes, dict):
            raise InvalidRequestError("malformed CloudEvent: the structured body is not a JSON object")
    missing = [a for a in REQUIRED_ATTRIBUTES if not isinstance(attributes.get(a), str) or not attributes[a]]
    if missing:
        raise InvalidRequestError(f"malformed CloudEvent: missing required attribute(s) {', '.join(missing)}",
                                  param=missing[0])
    if attributes["specversion"] != "1.0":
        raise InvalidRequestError(f"CloudEvents specversion {attributes['specversion']!r} is not supported (1.0 is)",
                                  param="specversion")


def request_of(event: CloudEvent) -> tuple[str, dict[str, Any]]:
    """The OpenAI route and body an event asks for (``stream`` dropped: a reply is one event)."""
    route = ROUTE_OF_TYPE.get(event.get_type())
    if route is None:
        raise InvalidRequestError(f"unknown event type {event.get_type()!r}; accepted: "
                                  f"{', '.join(ROUTE_OF_TYPE)}", param="type")
    data = event.get_data()
    if not isinstance(data, dict):
        raise InvalidRequestError("event data must be a JSON object (datacontenttype application/json)",
                                  param="data")
    data.pop("stream", None)
    return route, data


def reply(cause: CloudEvent, source: str, data: dict[str, Any]) -> CloudEvent:
    """The reply to ``cause`` carrying the OpenAI response ``data``."""
    return _event(events.REPLY_TYPE[cause.get_type()], source, cause, data)


def error_reply(cause: CloudEvent, source: str, error: HydraError) -> tuple[CloudEvent, int]:
    """An error event and its HTTP status: retryable failures keep theirs (503: Eventing
    retries, within its budget); one that will fail the same way again is a 422, which Eventing
    does not retry, so the event goes to the dead-letter sink at once."""
    status = error.status if error.status < 500 or error.retryable else 422
    return _event(events.ERROR, source, cause, error.to_openai()), status


def _event(event_type: str, source: str, cause: CloudEvent, data: dict[str, Any]) -> CloudEvent:
    return CloudEvent(attributes={"type": event_type, "source": source, "id": uuid.uuid4().hex,
                                  "subject": cause.get_id(), "datacontenttype": "application/json"}, data=data)


def encode(event: CloudEvent, binary: bool) -> tuple[dict[str, str], bytes]:
    """Headers and body of ``event`` in the request's mode."""
    message = ce_http.to_binary(event, _FORMAT) if binary else ce_http.to_structured(event, _FORMAT)
    return dict(message.headers), message.body
