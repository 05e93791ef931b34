"""The flags the README and docs/ show are the flags that exist: every ``hydraserve ...`` and
``kn hydra ...`` command in their shell blocks goes through the real argparse parser.

A literal command is parsed whole (an unknown flag, a bad value or a missing argument fails);
a usage template (``[--flag ...]``, ``a|b``, ``...``, placeholders such as ``N`` or ``DIR``)
has each of its words and flags looked up in the parser its verbs select.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import re
import shlex
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from hydraserve import cli
from hydraserve.cli import kn_hydra

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
PROGRAMS: dict[tuple[str, ...], Callable[[], argparse.ArgumentParser]] = {
    ("hydraserve",): cli.build_parser, ("kn", "hydra"): kn_hydra.build_parser}
_BLOCK = re.compile(r"^```(?:bash|sh|console)?\n(.*?)^```", re.S | re.M)  # docs/ leave the language out
_PLACEHOLDER = re.compile(r"^[A-Z][A-Z0-9_]*(\[.*\])?$")  # N, DIR, DIR_OR_S3_URI


def shell_lines(text: str) -> Iterator[str]:
    """Each line of the shell blocks (continuations joined, prompts dropped)."""
    for block in _BLOCK.findall(text):
        for line in block.replace("\\\n", " ").splitlines():
            yield line.strip().removeprefix("$ ")


def commands(line: str) -> Iterator[list[str]]:
    """The words of each command on ``line`` (``a; b`` and ``a && b`` are two), comments dropped."""
    try:
        words = shlex.split(line, comments=True)
    except ValueError:  # an unbalanced quote: not a command we can read
        return
    current: list[str] = []
    for word in words:
        if word in (";", "&&", "||"):
            yield current
            current = []
        elif word.endswith(";"):
            yield [*current, word[:-1]]
            current = []
        else:
            current.append(word)
    yield current


def documented() -> list[tuple[str, tuple[str, ...], list[str]]]:
    """(where, program, argv) for every hydraserve / kn hydra command the docs show."""
    found = []
    for doc in DOCS:
        for line in shell_lines(doc.read_text()):
            for words in commands(line):
                for program in PROGRAMS:
                    if tuple(words[:len(program)]) == program:
                        found.append((f"{doc.name}: {line}", program, words[len(program):]))
    return found


def is_template(argv: list[str]) -> bool:
    return any("[" in w or "]" in w or "..." in w or "|" in w or _PLACEHOLDER.match(w) for w in argv)


def subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    actions = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(actions[0].choices) if actions else {}


def check_template(parser: argparse.ArgumentParser, argv: list[str]) -> list[str]:
    """What in a usage template the parser does not know: a verb, or a flag of the verb."""
    words = [w.strip("[]") for w in argv]
    for index, word in enumerate(words):
        choices = subparsers(parser)
        if not choices or word.startswith("-") or word == "...":
            return [f"{flag}" for flag in (w.split("=")[0] for w in words[index:] if w.startswith("-"))
                    if flag not in parser._option_string_actions]
        alternatives = word.split("|")
        unknown = [a for a in alternatives if a not in choices]
        if unknown:
            return [f"verb {a}" for a in unknown]
        if len(alternatives) > 1:
            return [p for a in alternatives for p in check_template(choices[a], argv[index + 1:])]
        parser = choices[word]
    return []


def check_literal(parser: argparse.ArgumentParser, argv: list[str]) -> list[str]:
    """What the parser refuses in a literal command: its error, or the arguments it does not know."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            _, unknown = parser.parse_known_args(argv)
    except SystemExit as exc:  # --help, --version: 0
        return [] if exc.code == 0 else [err.getvalue().strip().splitlines()[-1]]
    return unknown


CASES = documented()


def test_the_docs_show_commands_of_both_programs() -> None:
    shown = {program for _, program, _ in CASES}
    assert shown == set(PROGRAMS) and len(CASES) > 20


@pytest.mark.parametrize(("where", "program", "argv"), CASES, ids=[f"{i}" for i in range(len(CASES))])
def test_every_documented_flag_exists(where: str, program: tuple[str, ...], argv: list[str]) -> None:
    parser = PROGRAMS[program]()
    check = check_template if is_template(argv) else check_literal
    assert check(parser, argv) == [], where
