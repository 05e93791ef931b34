"""The function's settings as command-line flags, generated from FunctionConfig.

Every command that takes a function's settings (``fn create/update``, ``kn hydra create``,
``up``, ``demo``, ``plan``) adds its flags here, so a flag has one name, one type and the
contract's one default, which ``--help`` shows; no command can disagree with another.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable
from typing import Any

from hydraserve.contracts.durations import duration_text, is_duration, parse_duration
from hydraserve.contracts.function import FunctionConfig, setting_default


def duration_arg(text: str) -> float:
    """parse_duration for argparse (its error becomes a usage message)."""
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def flag_of(field: str) -> str:
    """``ttft_slo_s`` -> ``--ttft-slo``: a setting's flag name."""
    return "--" + field.removesuffix("_s").replace("_", "-")


def _timed(field: str) -> bool:
    return is_duration(FunctionConfig.model_fields[field])


def default_text(field: str) -> str:
    """The contract's default of ``field`` as a user would type it (``7.5s``, ``32``)."""
    default = setting_default(field)
    return duration_text(default) if _timed(field) else str(default)


def add_setting_flags(parser: argparse.ArgumentParser, fields: Iterable[str], *, defaults: bool = True) -> None:
    """A flag per FunctionConfig field. ``defaults``: an absent flag is the contract's default
    (said in --help); otherwise None, for updates that change only what is given."""
    for field in fields:
        info = FunctionConfig.model_fields[field]
        kind: Any = duration_arg if _timed(field) else info.annotation
        shown = f" (default {default_text(field)})" if defaults else " (unchanged if not given)"
        parser.add_argument(flag_of(field), dest=field, type=kind, metavar="DURATION" if _timed(field) else "N",
                            default=setting_default(field) if defaults else None,
                            help=(info.description or field) + shown)


def given_settings(args: argparse.Namespace, fields: Iterable[str]) -> dict[str, Any]:
    """The FunctionConfig fields among ``fields`` the flags set (None: not given)."""
    return {f: getattr(args, f) for f in fields if getattr(args, f, None) is not None}
