"""The one place where exceptions become HTTP responses (OpenAI's error shape plus ``retryable``),
for every Flask app (runtime, placement service, loaderd) and, through ``framework_error`` and
``retry_after_header``, the aiohttp gateway. Clients read them back with
hydraserve.errors.error_from_response."""

from __future__ import annotations

import logging

from flask import Flask, Response, jsonify
from werkzeug.exceptions import HTTPException

from hydraserve.errors import HydraError, InvalidRequestError, NotFoundError, PayloadTooLargeError

log = logging.getLogger(__name__)

# Flask's own refusals (unknown route, wrong method, body over MAX_CONTENT_LENGTH) as our classes
_HTTP_CLASSES: dict[int, type[HydraError]] = {404: NotFoundError, 413: PayloadTooLargeError}


def retry_after_header(exc: HydraError) -> str | None:
    """The Retry-After value (whole seconds, at least 1) for an error that names one."""
    return None if exc.retry_after_s is None else str(max(1, round(exc.retry_after_s)))


def framework_error(status: int, message: str) -> HydraError:
    """A web framework's own refusal (unknown route, wrong method, body too large) as our class."""
    cls = _HTTP_CLASSES.get(status, InvalidRequestError if status < 500 else HydraError)
    return cls(message)


def error_response(exc: HydraError, status: int | None = None) -> Response:
    response = jsonify(exc.to_openai())
    response.status_code = status or exc.status
    retry_after = retry_after_header(exc)
    if retry_after is not None:
        response.headers["Retry-After"] = retry_after
    return response


def install_error_handlers(app: Flask) -> None:
    @app.errorhandler(HydraError)
    def _hydra(exc: HydraError) -> Response:
        if exc.status >= 500:
            log.warning("request failed: %s", exc.message)
        return error_response(exc)

    @app.errorhandler(HTTPException)
    def _http(exc: HTTPException) -> Response:
        status = exc.code or 500
        return error_response(framework_error(status, exc.description or exc.name), status)

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception) -> Response:
        log.exception("unhandled error")
        return error_response(HydraError(f"internal error: {type(exc).__name__}"))
