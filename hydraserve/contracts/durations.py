"""Durations as people write them (``7.5s``, ``200ms``, ``2m``, ``1h``, plain seconds) and back.

One parser and one writer for every place a duration is text: CLI flags (hydraserve/cli/flags.py
wraps the parser for argparse), Knative annotations (provider/knative/service.py writes them,
the interceptor reads them) and config files (``Duration`` fields of a pydantic model take
either a number of seconds or such a text).
"""

from __future__ import annotations

import math
import re
from typing import Annotated, Any

from pydantic import BeforeValidator
from pydantic.fields import FieldInfo

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?|\.\d+)\s*(ms|s|m|h)?\s*$")
_UNIT_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


def parse_duration(text: str) -> float:
    """Seconds in ``text``; ValueError naming it when it is not a duration."""
    match = _DURATION.match(text)
    if not match:
        raise ValueError(f"{text!r} is not a duration (e.g. 7.5s, 200ms, 2m, or seconds)")
    return float(match.group(1)) * _UNIT_S[match.group(2)]


def duration_text(seconds: float) -> str:
    """``7.5s`` or ``200ms``: what parse_duration reads back (and Go's ParseDuration, Knative's)."""
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"{seconds!r} is not a duration")
    return f"{_number(seconds * 1000)}ms" if 0 < seconds < 1 else f"{_number(seconds)}s"


def _number(value: float) -> str:
    """``value`` without an exponent or trailing zeros (microsecond precision)."""
    return f"{value:.6f}".rstrip("0").rstrip(".")


def _seconds(value: Any) -> Any:
    """A text is parsed; a number (or anything else) goes on to pydantic's float check."""
    return parse_duration(value) if isinstance(value, str) else value


_AS_SECONDS = BeforeValidator(_seconds)
Duration = Annotated[float, _AS_SECONDS]
"""Seconds, given as a number or as a duration text (config files, annotations, API bodies)."""


def is_duration(field: FieldInfo) -> bool:
    """Whether a model's field is a Duration (its flag then reads ``7.5s``, its default shows so)."""
    return _AS_SECONDS in field.metadata
