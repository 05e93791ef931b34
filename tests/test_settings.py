"""Every command that takes a function's settings takes them the same way: one flag name, one
type (durations read ``7.5s``), the one default FunctionConfig defines, shown in --help."""

from __future__ import annotations

import argparse
import importlib.metadata
from collections.abc import Callable

import pytest

import hydraserve
from hydraserve import cli
from hydraserve.cli import kn_hydra
from hydraserve.cli.flags import default_text, flag_of
from hydraserve.contracts.function import FunctionConfig, setting_default
from hydraserve.contracts.plan import FunctionSpec

MODEL = ["--model", "s3://models/m"]
# (how the command is typed, its parser, the argv that reaches it, whether an absent flag is the default)
COMMANDS: list[tuple[str, Callable[[], argparse.ArgumentParser], list[str], bool]] = [
    ("hydraserve up", cli.build_parser, ["up"], True),
    ("hydraserve plan", cli.build_parser, ["plan"], True),
    ("hydraserve demo", cli.build_parser, ["demo"], True),
    ("hydraserve fn create", cli.build_parser, ["fn", "create", "f", *MODEL], True),
    ("hydraserve fn update", cli.build_parser, ["fn", "update", "f"], False),
    ("kn hydra create", kn_hydra.build_parser, ["create", "f", *MODEL], True),
]
IDS = [name for name, *_ in COMMANDS]


def verb_parser(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.ArgumentParser:
    """The (sub)parser the leading words of ``argv`` select."""
    for word in argv:
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if not subs or word not in subs[0].choices:
            break
        parser = subs[0].choices[word]
    return parser


def setting_actions(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """The parser's flags named like a FunctionConfig setting's (a field with a default), by field."""
    flags = {flag_of(field): field for field, info in FunctionConfig.model_fields.items() if not info.is_required()}
    return {flags[option]: action for action in parser._actions for option in action.option_strings
            if option in flags}


@pytest.mark.parametrize(("name", "build", "argv", "defaults"), COMMANDS, ids=IDS)
def test_ttft_slo_reads_a_duration_everywhere(name: str, build: Callable[[], argparse.ArgumentParser],
                                              argv: list[str], defaults: bool) -> None:
    for text, seconds in (("7.5s", 7.5), ("7.5", 7.5), ("7500ms", 7.5)):
        assert build().parse_args([*argv, "--ttft-slo", text]).ttft_slo_s == seconds, (name, text)
    with pytest.raises(SystemExit):
        build().parse_args([*argv, "--ttft-slo", "soon"])


@pytest.mark.parametrize(("name", "build", "argv", "defaults"), COMMANDS, ids=IDS)
def test_each_setting_flag_has_the_contracts_default_and_help_shows_it(
        name: str, build: Callable[[], argparse.ArgumentParser], argv: list[str], defaults: bool) -> None:
    parser = build()
    given = setting_actions(verb_parser(parser, argv))
    assert "ttft_slo_s" in given, name
    parsed = parser.parse_args(argv)
    help_text = verb_parser(parser, argv).format_help()
    for field, action in given.items():
        assert action.dest == field, (name, field)  # what the command hands to FunctionConfig
        assert getattr(parsed, field) == (setting_default(field) if defaults else None), (name, field)
        if defaults:
            assert f"(default {default_text(field)})" in " ".join(help_text.split()), (name, field)


def test_the_function_commands_share_one_vocabulary() -> None:
    """fn create and kn hydra create take the same settings (kn hydra: also --idle-timeout)."""
    fn = setting_actions(verb_parser(cli.build_parser(), ["fn", "create"]))
    kn = setting_actions(verb_parser(kn_hydra.build_parser(), ["create"]))
    assert set(fn) == set(kn) and "idle_timeout_s" in kn


def test_the_planners_slo_defaults_are_the_functions() -> None:
    spec = FunctionSpec(name="f", model_uri="s3://b/m", model_size_bytes=1, num_layers=1)
    assert (spec.ttft_slo_s, spec.tpot_slo_s) == (setting_default("ttft_slo_s"), setting_default("tpot_slo_s"))


def test_version_is_the_installed_distributions(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        cli.main(["--version"])
    assert exited.value.code == 0
    assert capsys.readouterr().out.strip() == f"hydraserve {importlib.metadata.version('hydraserve')}"


def test_version_falls_back_to_the_packages_without_an_install(monkeypatch: pytest.MonkeyPatch) -> None:
    def missing(name: str) -> str:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", missing)
    assert cli.version() == hydraserve.__version__
