"""The `hydraserve` command: every listed subcommand exists, and a missing or broken one fails
loudly instead of quietly vanishing from --help."""

from __future__ import annotations

import subprocess
import sys

import pytest

from hydraserve import cli


def test_every_listed_command_is_built() -> None:
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert set(sub.choices) == {name for name, _, _ in cli.COMMANDS}  # type: ignore[union-attr]


def test_a_missing_command_module_fails_loudly(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cli, "COMMANDS", [*cli.COMMANDS, ("ghost", "not built", "hydraserve.no_such_module")])
    with pytest.raises(ModuleNotFoundError, match=r"hydraserve\.no_such_module"):
        cli.build_parser()


def test_help_is_instant_and_imports_no_heavy_library() -> None:
    code = ("import sys; from hydraserve.cli import build_parser; build_parser(); "
            "print(sorted(m for m in ('torch', 'boto3', 'transformers') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_fn_update_with_nothing_to_change_is_refused_before_asking_the_gateway(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("HYDRASERVE_GATEWAY_TOKEN", "t" * 32)
    assert cli.main(["fn", "update", "f", "--gateway", "http://127.0.0.1:9"]) == 2  # asking would be a 1: unreachable
    assert "nothing to change" in capsys.readouterr().err
