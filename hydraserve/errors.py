"""Error types that carry their own retry decision and HTTP status.

Every component raises these (or subclasses); the servers map them to responses in one place
(OpenAI's error shape: {"error": {"message", "type", "param", "code"}}). ``retryable`` tells a
caller whether trying again can help; ``retry_after_s`` says when.
"""

from __future__ import annotations


class HydraError(Exception):
    """Base error: an HTTP status, an OpenAI error type and a retry decision."""

    status = 500
    error_type = "internal_error"
    retryable = False

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None,
                 retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code
        self.retry_after_s = retry_after_s

    def to_openai(self) -> dict[str, object]:
        """The body OpenAI clients expect for an error."""
        return {"error": {"message": self.message, "type": self.error_type,
                          "param": self.param, "code": self.code}}


class InvalidRequestError(HydraError):
    """The request is malformed or its parameters are out of range: fix it, do not retry."""

    status = 400
    error_type = "invalid_request_error"


class ContextLengthError(InvalidRequestError):
    """The prompt (plus max_tokens) does not fit the model's context."""

    def __init__(self, message: str, *, param: str | None = "prompt") -> None:
        super().__init__(message, param=param, code="context_length_exceeded")


class NotFoundError(HydraError):
    """Unknown function, model or route."""

    status = 404
    error_type = "not_found_error"


class PayloadTooLargeError(InvalidRequestError):
    """The request body is larger than the server accepts."""

    status = 413


class TemporaryError(HydraError):
    """Something failed that may work if tried again after ``retry_after_s``."""

    status = 503
    error_type = "service_unavailable"
    retryable = True


class OverloadedError(TemporaryError):
    """A bounded queue is full or a deadline passed while waiting."""

    status = 503


class PermanentError(HydraError):
    """Something failed that will fail the same way again (bad credentials, missing object)."""

    status = 502
    error_type = "upstream_error"


class StorageError(PermanentError):
    """S3 answered with an error for a named object (missing key, access denied, bad bucket)."""


class IntegrityError(HydraError):
    """Fetched bytes do not match the manifest (size or sha256); they are never handed out."""

    status = 502
    error_type = "integrity_error"
    retryable = True
