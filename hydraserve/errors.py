"""Error types that carry their own retry decision and HTTP status, the same on both sides of a wire.

Every component raises these; the servers turn them into responses in one place
(hydraserve.http_errors: OpenAI's error shape ``{"error": {"message", "type", "param", "code"}}``
plus ``"retryable"``), and every client turns a response back into the same class with
:func:`error_from_response`, so a retryable integrity failure stays retryable after crossing
HTTP. Each class is identified on the wire by its ``error_type`` (and ``error_code`` where it
shares OpenAI's ``invalid_request_error`` type); every subclass must declare one of them, so
no two classes can be confused. ``retryable`` tells a caller whether trying again can help;
``retry_after_s`` says when.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

_BY_WIRE_NAME: dict[tuple[str, str | None], type[HydraError]] = {}


class HydraError(Exception):
    """Base error: an HTTP status, an OpenAI error type and a retry decision."""

    status: ClassVar[int] = 500
    error_type: ClassVar[str] = "internal_error"
    error_code: ClassVar[str | None] = None  # fixed code of classes that share an OpenAI type
    retryable: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "error_type" not in cls.__dict__ and "error_code" not in cls.__dict__:
            raise TypeError(f"{cls.__name__} must declare error_type or error_code (its name on the wire)")
        key = (cls.error_type, cls.error_code)
        if key in _BY_WIRE_NAME:
            raise TypeError(f"{cls.__name__} and {_BY_WIRE_NAME[key].__name__} share the wire name {key}")
        _BY_WIRE_NAME[key] = cls

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None,
                 retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code or self.error_code
        self.retry_after_s = retry_after_s

    def to_openai(self) -> dict[str, object]:
        """The response body: OpenAI's error shape, plus whether retrying can help."""
        return {"error": {"message": self.message, "type": self.error_type, "param": self.param,
                          "code": self.code, "retryable": self.retryable}}


_BY_WIRE_NAME[(HydraError.error_type, None)] = HydraError


class InvalidRequestError(HydraError):
    """The request is malformed or its parameters are out of range: fix it, do not retry."""

    status = 400
    error_type = "invalid_request_error"


class ContextLengthError(InvalidRequestError):
    """The prompt (plus max_tokens) does not fit the model's context."""

    error_code = "context_length_exceeded"

    def __init__(self, message: str, *, param: str | None = "prompt", **kwargs: Any) -> None:
        super().__init__(message, param=param, **kwargs)


class PayloadTooLargeError(InvalidRequestError):
    """The request body is larger than the server accepts."""

    status = 413
    error_code = "payload_too_large"


class UnsupportedMediaTypeError(InvalidRequestError):
    """The body is not of a type the route accepts (a JSON route sent text/plain)."""

    status = 415
    error_code = "unsupported_media_type"


class SafetensorsFormatError(InvalidRequestError):
    """The bytes are not a valid safetensors header (names the file)."""

    error_type = "safetensors_format_error"


class UnsupportedModelError(InvalidRequestError):
    """config.json describes an architecture or option this runtime cannot run, or a checkpoint
    holds a tensor its architecture does not have (the message names it)."""

    error_type = "unsupported_model_error"


class UnauthorizedError(HydraError):
    """Missing or wrong bearer token."""

    status = 401
    error_type = "authentication_error"


class ForbiddenError(HydraError):
    """The token is valid but does not allow this (another model, another's lease, an S3
    endpoint the service was not configured for, a pid that is not the caller's)."""

    status = 403
    error_type = "permission_error"


class NotFoundError(HydraError):
    """Unknown function, model, file, lease or route."""

    status = 404
    error_type = "not_found_error"


class MissingObjectError(NotFoundError):
    """A model's file is not there: no such key in S3, no such file on disk. One class for both
    stores, so a caller asks ``isinstance``, never an error code (an optional file's absence is
    not an error; a missing weight file is, and no retry makes it appear)."""

    error_code = "no_such_key"


class ConflictError(HydraError):
    """The thing already exists (a function of that name)."""

    status = 409
    error_type = "conflict_error"


class TemporaryError(HydraError):
    """Something failed that may work if tried again after ``retry_after_s``."""

    status = 503
    error_type = "service_unavailable"
    retryable = True


class OverloadedError(TemporaryError):
    """A bounded queue or budget is full, or a deadline passed while waiting."""

    error_type = "overloaded_error"


class UnreachableError(TemporaryError):
    """Nothing answered at a service's address (down, not started yet, or the wrong address),
    or it stopped answering before its answer came."""

    error_type = "unreachable_error"


class NotListeningError(UnreachableError):
    """Nothing listens at the address: the request never arrived (safe to do its work elsewhere,
    which an UnreachableError alone does not say: a request sent may have been carried out)."""

    error_type = "not_listening_error"


class InstanceFailedError(TemporaryError):
    """A function instance can no longer serve (a stage died, a worker was lost): a request that has no token yet can be tried again on a fresh instance. ``nodes``
    names the nodes whose workers were lost (a fresh plan avoids them), when known."""

    error_type = "instance_failed"

    def __init__(self, message: str, *, nodes: tuple[str, ...] = (), **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.nodes = nodes


class FunctionFailedError(HydraError):
    """The function's last cold start failed for a reason another start cannot fix (its model is
    missing a file, unsupported, corrupt): answered at once, without starting again, until the
    function or its model changes. A 4xx, so neither OpenAI clients nor Eventing retry it."""

    status = 424
    error_type = "function_failed"


def fails_every_start(exc: BaseException) -> bool:
    """Whether a cold start that raised ``exc`` would fail the same way every time: the request
    or the model is wrong (4xx), storage refused for good, or the bytes do not match their
    manifest after loaderd's own retries. Crashes, timeouts and overload may pass."""
    if isinstance(exc, IntegrityError | PermanentError):
        return True
    return isinstance(exc, HydraError) and not exc.retryable and 400 <= exc.status < 500 \
        and not isinstance(exc, UnauthorizedError | ForbiddenError)


class PermanentError(HydraError):
    """Something failed that will fail the same way again (bad credentials, missing object)."""

    status = 502
    error_type = "upstream_error"


class StorageError(PermanentError):
    """S3 answered with an error for a named object (missing key, access denied, bad bucket)."""

    error_type = "storage_error"


class IntegrityError(HydraError):
    """Fetched bytes do not match the manifest (size or sha256); they are never handed out.
    Retryable: the next fetch may get good bytes (a corrupted transfer, a repaired object)."""

    status = 502
    error_type = "integrity_error"
    retryable = True


class EngineError(HydraError):
    """A step failed inside the model; the affected requests end with this error."""

    status = 500
    error_type = "engine_error"


def error_class(error_type: str | None, code: str | None = None) -> type[HydraError] | None:
    """The class a wire name stands for (``code`` first picks a class that shares its type)."""
    if error_type is None:
        return None
    return _BY_WIRE_NAME.get((error_type, code)) or _BY_WIRE_NAME.get((error_type, None))


def class_for_status(status: int, retryable: object) -> type[HydraError]:
    """For bodies that name no known class (another server, a proxy): the status decides."""
    if status == 401:
        return UnauthorizedError
    if status == 403:
        return ForbiddenError
    if status == 404:
        return NotFoundError
    if status == 409:
        return ConflictError
    if status == 413:
        return PayloadTooLargeError
    if status == 415:
        return UnsupportedMediaTypeError
    if 400 <= status < 500:
        return OverloadedError if status == 429 else InvalidRequestError
    if status == 503 or retryable is True:
        return TemporaryError
    return PermanentError if status in (502, 504) else HydraError


def error_from_response(status: int, body: object, *, source: str,
                        retry_after: str | None = None) -> HydraError:
    """The error a JSON response carries, as the class that raised it on the other side.

    ``body`` is the decoded JSON (or the raw text when it was not JSON); ``source`` prefixes the
    message ("loaderd /v1/prefetch"); ``retry_after`` is the Retry-After header, if any.
    """
    error = body.get("error") if isinstance(body, Mapping) else None
    if not isinstance(error, Mapping):
        error = {"message": str(body)[:300]}
    code = error.get("code") if isinstance(error.get("code"), str) else None
    cls = error_class(error.get("type") if isinstance(error.get("type"), str) else None, code)
    cls = cls or class_for_status(status, error.get("retryable"))
    try:
        after = float(retry_after) if retry_after else None
    except ValueError:
        after = None
    param = error.get("param") if isinstance(error.get("param"), str) else None
    return cls(f"{source}: {status} {error.get('message')}", param=param, code=code, retry_after_s=after)
