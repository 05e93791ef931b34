"""Structured (JSON lines) logging for every long-running component, with secret redaction.

One line per record: time, level, component, logger, message, plus any ``extra`` fields.
Values of keys that look like secrets, and known secret values from the environment, are
replaced with "***" so a token or AWS key never reaches a log file.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import time
from collections.abc import Iterable, Mapping

_SECRET_KEYS = re.compile(r"(secret|token|password|credential|authorization|access_key)", re.I)
_SECRET_ENV = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "HYDRASERVE_LOADERD_TOKEN", "AWS_ACCESS_KEY_ID")
_STD_ATTRS = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime"}


def _known_secrets() -> list[str]:
    return [v for k in _SECRET_ENV if (v := os.environ.get(k)) and len(v) >= 4]


def secret_values(env: Mapping[str, str]) -> list[str]:
    """The values in ``env`` that are secrets (by their key), as ``redact`` takes them."""
    return [v for k, v in env.items() if (k in _SECRET_ENV or _SECRET_KEYS.search(k)) and len(v) >= 4]


def redact(text: str, secrets: Iterable[str] | None = None) -> str:
    """``text`` with each of ``secrets`` (default: this process's, from its environment) as "***"."""
    for secret in _known_secrets() if secrets is None else secrets:
        text = text.replace(secret, "***")
    return text


class JsonFormatter(logging.Formatter):
    def __init__(self, component: str) -> None:
        super().__init__()
        self.component = component

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "ts": round(record.created, 3),
            "time": time.strftime("%H:%M:%S", time.localtime(record.created)),
            "level": record.levelname.lower(),
            "component": self.component,
            "logger": record.name,
            "msg": redact(record.getMessage()),
        }
        for key, value in record.__dict__.items():
            if key not in _STD_ATTRS and not key.startswith("_"):
                entry[key] = "***" if _SECRET_KEYS.search(key) else value
        if record.exc_info:
            entry["exc"] = redact(self.formatException(record.exc_info))
        return json.dumps(entry, default=str)


def configure_logging(component: str, level: str | None = None) -> None:
    """JSON lines to stderr for the whole process; call once from an entry point."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(component))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level or os.environ.get("HYDRASERVE_LOG_LEVEL", "INFO"))
    for noisy in ("botocore", "urllib3", "waitress.queue", "werkzeug"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
