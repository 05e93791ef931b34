"""JSON request bodies in, validated pydantic models out, for every HTTP server of the platform.

Malformed JSON and validation failures become InvalidRequestError (400) naming the first
offending field, so every component answers bad input the same way. Flask is imported only by
``read_json``: a vLLM worker must not have Flask's request proxy among its modules (vLLM walks
every module's attributes at start-up, and the proxy raises outside a request).
"""

from __future__ import annotations

import json
import math
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from hydraserve.errors import InvalidRequestError, UnsupportedMediaTypeError

M = TypeVar("M", bound=BaseModel)


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON value")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text[:40]} is out of range for a number")
    return value


def decode_json(raw: bytes) -> Any:
    """``raw`` decoded as JSON, or a 400 saying why it is not (not JSON, nested too deep, or
    Python's ``NaN`` and ``Infinity``, or a number past a float such as ``1e999``: a setting
    of infinity would never end, then be written back as invalid JSON)."""
    try:
        return json.loads(raw, parse_constant=_no_constant, parse_float=_finite_float)
    except ValueError as exc:  # not JSON, not UTF-8, or an integer over Python's 4,300 digits
        raise InvalidRequestError(f"request body is not valid JSON: {exc}") from None
    except RecursionError:
        raise InvalidRequestError("request body is nested too deep") from None


def read_json() -> Any:
    """The Flask request's body decoded as JSON, or a 4xx saying why it is not: not declared as
    JSON (415), not JSON or nested too deep to decode (400)."""
    from flask import request

    if not request.is_json:
        raise UnsupportedMediaTypeError(f"request body must be application/json, not {request.mimetype or 'untyped'!r}")
    return decode_json(request.get_data(cache=True))


def validate(model: type[M], data: Any) -> M:
    """``data`` as ``model``; the first problem becomes an InvalidRequestError with its param."""
    if not isinstance(data, dict):
        raise InvalidRequestError("request body must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        param = ".".join(str(p) for p in first["loc"]) or None
        raise InvalidRequestError(f"{param}: {first['msg']}" if param else first["msg"],
                                  param=param, code="validation_error") from None


def json_body(model: type[M]) -> M:
    """The request body validated as ``model``."""
    return validate(model, read_json())
