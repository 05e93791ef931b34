"""The layout says what runs where, and the import graph keeps it true.

A module is one deployment's if a package on its path is named ``embedded`` (only `hydraserve
up`/`demo`) or ``knative`` (only on Kubernetes); ``cli`` and ``testing`` sit on top of both;
every other module is shared, runs in both, and must import neither deployment's code, or
the embedded stack would drag Kubernetes code into a laptop run, or the reverse. import-linter
holds the two deployments apart (pyproject.toml); this checks the shared side, which a
contract can only name module by module.
"""

from __future__ import annotations

import re
from pathlib import Path

import grimp
import pytest

ON_TOP = ("hydraserve.cli", "hydraserve.testing")


def where(module: str) -> str:
    """'embedded', 'knative', 'top' (commands and fakes) or 'shared'."""
    if module.startswith(ON_TOP):
        return "top"
    parts = module.split(".")
    for deployment in ("embedded", "knative"):
        if deployment in parts:
            return deployment
    return "shared"


@pytest.fixture(scope="module")
def graph() -> grimp.ImportGraph:
    return grimp.build_graph("hydraserve", exclude_type_checking_imports=True)


def test_where_reads_the_path() -> None:
    assert where("hydraserve.activator.embedded.gateway") == "embedded"
    assert where("hydraserve.embedded.stack") == "embedded"
    assert where("hydraserve.activator.knative.interceptor") == "knative"
    assert where("hydraserve.provider.planner") == "shared"
    assert where("hydraserve.cli.up") == "top"


def test_shared_code_imports_neither_deployments_code(graph: grimp.ImportGraph) -> None:
    crossings = sorted(
        f"{importer} -> {imported}"
        for importer in graph.modules if where(importer) == "shared"
        for imported in graph.find_modules_directly_imported_by(importer)
        if where(imported) in ("embedded", "knative"))
    assert crossings == []


def test_each_deployment_has_code_in_each_component(graph: grimp.ImportGraph) -> None:
    """The map in docs/LAYOUT.md: both activators, both deployments' provider parts, the pool."""
    for package in ("hydraserve.activator.embedded", "hydraserve.activator.knative",
                    "hydraserve.provider.embedded", "hydraserve.provider.knative",
                    "hydraserve.runtime.embedded", "hydraserve.embedded"):
        assert package in graph.modules


RUNS = {"embedded": "embedded only", "knative": "Kubernetes only", "shared": "both", "top": "command / test"}


def test_every_module_is_on_the_map_with_where_it_runs(graph: grimp.ImportGraph) -> None:
    """docs/LAYOUT.md lists each module under its package with the deployment its path says."""
    text = (Path(__file__).parents[1] / "docs" / "LAYOUT.md").read_text()
    listed: dict[str, str] = {}
    package = ""
    for line in text.splitlines():
        if heading := re.fullmatch(r"## `(.+)/`", line):
            package = heading[1].replace("/", ".")
            package = package if package.startswith("hydraserve") else f"hydraserve.{package}"
        elif row := re.fullmatch(r"\| `(\w+)\.py` \| ([^|]+) \|.*", line):
            listed[f"{package}.{row[1]}"] = row[2].strip()
    modules = {m for m in graph.modules if not m.endswith("__main__") and not graph.find_children(m)}  # not packages
    assert sorted(modules - listed.keys()) == []
    assert sorted(listed.keys() - modules) == []
    assert {m: runs for m, runs in listed.items() if RUNS[where(m)] != runs} == {}
