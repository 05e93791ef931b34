"""CloudEvents on POST /: binary or structured request in, reply event out (same mode).

The compact engine's worker (its Flask app); the events themselves are parsed and built by
hydraserve.http_events, as for the vLLM worker. A malformed event gets a plain 400
JSON error; a well-formed event with bad data gets an error *event* with a 4xx status, so
Knative Eventing dead-letters it instead of retrying forever.
"""

from __future__ import annotations

import logging

from cloudevents.core.v1.event import CloudEvent
from flask import Blueprint, Response, request

from hydraserve import http_events as events_wire
from hydraserve.contracts import events
from hydraserve.errors import EngineError, HydraError
from hydraserve.http_events import Mode
from hydraserve.http_json import validate
from hydraserve.http_server import client_gone
from hydraserve.runtime.server import generation
from hydraserve.runtime.server.schemas import ChatCompletionRequest, CompletionRequest
from hydraserve.runtime.server.state import RuntimeState

log = logging.getLogger(__name__)


def parse_event() -> tuple[CloudEvent, Mode]:
    """The Flask request's CloudEvent and the mode it came in."""
    return events_wire.parse_event({k.lower(): v for k, v in request.headers.items()}, request.get_data())


def create_cloudevents_blueprint(state: RuntimeState, ready_wait_s: float) -> Blueprint:
    bp = Blueprint("cloudevents", __name__)

    @bp.post("/")
    def receive() -> Response:
        event, mode = parse_event()
        source = events.SOURCE_PREFIX + (state.function_name or "local")
        try:
            route, data = events_wire.request_of(event)
            if route == "/v1/chat/completions":
                chat = validate(ChatCompletionRequest, data)
                prepared = generation.prepare_chat(state.engine(ready_wait_s), chat)
            else:
                completion = validate(CompletionRequest, data)
                prepared = generation.prepare_completion(state.engine(ready_wait_s), completion)
            engine = state.engine(ready_wait_s)
            result = generation.complete(engine, prepared, client_gone(request.environ))
            return _respond(events_wire.reply(event, source, result), 200, mode)
        except HydraError as exc:
            return _respond(*events_wire.error_reply(event, source, exc), mode)
        except Exception as exc:  # a poison event: answered so that Eventing dead-letters it
            log.exception("event %s could not be processed", event.get_id())
            error = EngineError(f"the event could not be processed: {type(exc).__name__}")
            return _respond(*events_wire.error_reply(event, source, error), mode)

    return bp


def _respond(event: CloudEvent, status: int, mode: Mode) -> Response:
    headers, body = events_wire.encode(event, mode)
    return Response(body, status=status, headers=headers)
