"""The one place where exceptions become HTTP responses (OpenAI's error shape), for every Flask app
(runtime, gateway, placement service, loaderd)."""

from __future__ import annotations

import logging

from flask import Flask, Response, jsonify
from werkzeug.exceptions import HTTPException

from hydraserve.errors import HydraError

log = logging.getLogger(__name__)

_HTTP_TYPES = {404: "not_found_error", 405: "invalid_request_error", 413: "invalid_request_error"}


def error_response(exc: HydraError) -> Response:
    response = jsonify(exc.to_openai())
    response.status_code = exc.status
    if exc.retry_after_s is not None:
        response.headers["Retry-After"] = str(max(1, round(exc.retry_after_s)))
    return response


def http_error_response(status: int, message: str, error_type: str | None = None) -> Response:
    response = jsonify({"error": {"message": message, "type": error_type or _HTTP_TYPES.get(status, "error"),
                                  "param": None, "code": None}})
    response.status_code = status
    return response


def install_error_handlers(app: Flask) -> None:
    @app.errorhandler(HydraError)
    def _hydra(exc: HydraError) -> Response:
        if exc.status >= 500:
            log.warning("request failed: %s", exc.message)
        return error_response(exc)

    @app.errorhandler(HTTPException)
    def _http(exc: HTTPException) -> Response:
        return http_error_response(exc.code or 500, exc.description or exc.name)

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception) -> Response:
        log.exception("unhandled error")
        return http_error_response(500, f"internal error: {type(exc).__name__}", "internal_error")
