"""CloudEvents over HTTP, framework-free: parse a request event, build reply and error events.

Shared by the workers' front (hydraserve.runtime.serving.front) on ``POST /`` and by the gateway, which answers an
event it fails itself with the same error event; it pulls in neither torch nor a web framework.
Types and the data schema are in hydraserve.contracts.events; docs/CLOUDEVENTS.md says what a
client sees. Required attributes are checked as sent (the SDK would make up a missing id).
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from typing import Any, Literal

from cloudevents.core.bindings import http as ce_http
from cloudevents.core.formats.json import JSONFormat
from cloudevents.core.v1.event import CloudEvent

from hydraserve.contracts import events
from hydraserve.errors import HydraError, InvalidRequestError, UnsupportedMediaTypeError
from hydraserve.http_json import decode_json

_FORMAT = JSONFormat()
STRUCTURED_CONTENT_TYPE = JSONFormat.CONTENT_TYPE  # application/cloudevents+json
REQUIRED_ATTRIBUTES = ("specversion", "id", "source", "type")
ROUTE_OF_TYPE = {events.COMPLETION_REQUEST: "/v1/completions", events.CHAT_REQUEST: "/v1/chat/completions"}

Mode = Literal["binary", "structured"]


def mode_of(headers: Mapping[str, str]) -> Mode | None:
    """How a request carries a CloudEvent (``headers`` lower-cased): in ce-* headers (binary),
    as its whole body (structured), or not at all (None)."""
    if any(k.startswith("ce-") for k in headers):
        return "binary"
    if headers.get("content-type", "").startswith(STRUCTURED_CONTENT_TYPE):
        return "structured"
    return None


def parse_event(headers: Mapping[str, str], body: bytes) -> tuple[CloudEvent, Mode]:
    """The request's CloudEvent and the mode it came in (``headers`` lower-cased)."""
    mode = mode_of(headers)
    if mode is None:
        raise InvalidRequestError("not a CloudEvent: expected ce-* headers (binary mode) or "
                                  f"Content-Type {STRUCTURED_CONTENT_TYPE} (structured mode)")
    _check_required(headers, body, mode)
    if mode == "binary" and not headers.get("content-type", "").strip():
        # the SDKs send no Content-Type for an event without datacontenttype: its data is JSON
        headers = {**headers, "content-type": "application/json"}
    try:
        event = ce_http.from_http(ce_http.HTTPMessage(headers=dict(headers), body=body), _FORMAT)
    except Exception as exc:  # the SDK raises assorted types for malformed input
        raise InvalidRequestError(f"malformed CloudEvent: {exc}") from None
    return event, mode  # type: ignore[return-value]


def _check_required(headers: Mapping[str, str], body: bytes, mode: Mode) -> None:
    if mode == "binary":
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


def event_id(headers: Mapping[str, str], body: bytes | None) -> str | None:
    """The id of the event a request carries, if it can be read (``body`` None: not read, as for
    a body refused by its size); what an error about the event names as its subject."""
    mode = mode_of(headers)
    if mode == "binary":
        body = b""  # its id is in its headers: its data need not be decoded again
    if mode is None or body is None:
        return None
    try:
        event, _ = parse_event(headers, body)
    except HydraError:
        return None
    return event.get_id()


def request_of(event: CloudEvent) -> tuple[str, dict[str, Any]]:
    """The OpenAI route and body an event asks for (``stream`` dropped: a reply is one event)."""
    route = ROUTE_OF_TYPE.get(event.get_type())
    if route is None:
        raise InvalidRequestError(f"unknown event type {event.get_type()!r}; accepted: "
                                  f"{', '.join(ROUTE_OF_TYPE)}", param="type")
    data = event.get_data()
    if not isinstance(data, dict):
        content_type = event.get_datacontenttype()
        if content_type and not JSONFormat.JSON_CONTENT_TYPE_PATTERN.match(content_type):
            raise UnsupportedMediaTypeError(f"event data of type {content_type!r}: it must be a JSON object "
                                            "(Content-Type or datacontenttype application/json, or none)",
                                            param="datacontenttype")
        raise InvalidRequestError("event data must be a JSON object (datacontenttype application/json)",
                                  param="data")
    data.pop("stream", None)
    return route, data


def reply(cause: CloudEvent, source: str, data: dict[str, Any]) -> CloudEvent:
    """The reply to ``cause`` carrying the OpenAI response ``data``."""
    return _event(events.REPLY_TYPE[cause.get_type()], source, cause.get_id(), data)


def error_event(source: str, error: HydraError, subject: str | None) -> CloudEvent:
    """The ``dev.hydraserve.error`` event for ``error`` (data: OpenAI's error shape) about the
    event whose id is ``subject`` (None: it could not be read)."""
    return _event(events.ERROR, source, subject, error.to_openai())


def error_reply(cause: CloudEvent, source: str, error: HydraError) -> tuple[CloudEvent, int]:
    """A worker's error event and its HTTP status: retryable failures keep theirs (503: Eventing
    retries, within its budget); one that will fail the same way again is a 422, which Eventing
    does not retry, so the event goes to the dead-letter sink at once."""
    status = error.status if error.status < 500 or error.retryable else 422
    return error_event(source, error, cause.get_id()), status


def _event(event_type: str, source: str, subject: str | None, data: dict[str, Any]) -> CloudEvent:
    attributes = {"type": event_type, "source": source, "id": uuid.uuid4().hex, "datacontenttype": "application/json"}
    if subject is not None:
        attributes["subject"] = subject
    return CloudEvent(attributes=attributes, data=data)


def encode(event: CloudEvent, mode: Mode) -> tuple[dict[str, str], bytes]:
    """Headers and body of ``event`` in the request's mode."""
    message = ce_http.to_binary(event, _FORMAT) if mode == "binary" else ce_http.to_structured(event, _FORMAT)
    return dict(message.headers), message.body
