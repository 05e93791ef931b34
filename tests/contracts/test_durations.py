"""Durations: one parser and one writer for flags, annotations and config files."""

from __future__ import annotations

import math

import pytest
from pydantic import ValidationError

from hydraserve.contracts.durations import duration_text, parse_duration
from hydraserve.contracts.function import FunctionConfig


@pytest.mark.parametrize(("text", "seconds"), [
    ("7.5s", 7.5), ("200ms", 0.2), ("2m", 120.0), ("1h", 3600.0), ("7.5", 7.5), ("30", 30.0), (" 0.5 s ", 0.5),
    (".5s", 0.5), ("0", 0.0),
])
def test_a_duration_text_is_read_as_seconds(text: str, seconds: float) -> None:
    assert math.isclose(parse_duration(text), seconds)


@pytest.mark.parametrize("text", ["", "s", "7.5x", "-1s", "1e3", "nan", "inf", "7.5 s s", "1m30s"])
def test_anything_else_is_a_value_error_naming_it(text: str) -> None:
    with pytest.raises(ValueError, match="is not a duration"):
        parse_duration(text)


@pytest.mark.parametrize(("seconds", "text"), [
    (7.5, "7.5s"), (0.2, "200ms"), (30.0, "30s"), (0.0, "0s"), (600.0, "600s"), (0.0005, "0.5ms"),
    (1_234_567.0, "1234567s"),
])
def test_the_writer_spells_what_the_parser_reads(seconds: float, text: str) -> None:
    assert duration_text(seconds) == text
    assert math.isclose(parse_duration(text), seconds)


@pytest.mark.parametrize("seconds", [-1.0, math.inf, math.nan])
def test_the_writer_refuses_what_is_not_a_duration(seconds: float) -> None:
    with pytest.raises(ValueError):
        duration_text(seconds)


def test_a_config_takes_a_duration_as_seconds_or_as_text() -> None:
    config = FunctionConfig.model_validate({"name": "f", "model_uri": "s3://b/m", "ttft_slo_s": "7.5s",
                                            "tpot_slo_s": "200ms", "idle_timeout_s": "2m", "request_timeout_s": 60})
    assert (config.ttft_slo_s, config.tpot_slo_s, config.idle_timeout_s, config.request_timeout_s) == (
        7.5, 0.2, 120.0, 60.0)
    with pytest.raises(ValidationError, match="is not a duration"):
        FunctionConfig.model_validate({"name": "f", "model_uri": "s3://b/m", "ttft_slo_s": "soon"})
    with pytest.raises(ValidationError, match="greater than 0"):
        FunctionConfig.model_validate({"name": "f", "model_uri": "s3://b/m", "ttft_slo_s": "0s"})
