"""The code's shape, as issue 20's note reports it: modules, modules over 500 lines, the longest
functions, the median function, lines per package, and package-level import edges and cycles.

Reads a source checkout (default: this one) with ast and grimp (import-linter's graph), so any
commit can be measured from a git worktree of it: ``git worktree add /tmp/before REV`` then
``PYTHONPATH=/tmp/before python benchmarks/layout_figures.py /tmp/before``. Prints one JSON
object.
Run: python benchmarks/layout_figures.py [CHECKOUT]
"""

from __future__ import annotations

import argparse
import ast
import collections
import json
import os
import statistics
import sys
from pathlib import Path
from typing import Any

COMPONENTS = ("activator", "provider", "runtime", "loaderd")  # symlinked into hydraserve/


def modules(root: Path) -> dict[str, Path]:
    """Dotted module name -> file, for the package and the components it links to."""
    found = {".".join(f.relative_to(root).with_suffix("").parts): f for f in (root / "hydraserve").rglob("*.py")}
    for component in COMPONENTS:  # rglob does not follow the symlinks
        for f in (root / component).rglob("*.py"):
            found["hydraserve." + ".".join(f.relative_to(root).with_suffix("").parts)] = f
    return found


def package(module: str) -> str:
    """The package a module is counted under: a component's subpackage, else the top one."""
    parts = module.split(".")
    if len(parts) < 2:
        return module
    if parts[1] in ("activator", "provider", "runtime") and len(parts) > 3:
        return ".".join(parts[:3])
    return ".".join(parts[:2])


def figures(root: Path) -> dict[str, Any]:
    import grimp

    files = modules(root)
    lines = {m: len(f.read_text().splitlines()) for m, f in files.items()}
    per_package: collections.Counter[str] = collections.Counter()
    for m, n in lines.items():
        per_package[package(m)] += n
    functions = sorted(((node.end_lineno or node.lineno) - node.lineno + 1, f"{m}.{node.name}")
                       for m, f in files.items() for node in ast.walk(ast.parse(f.read_text()))
                       if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef))
    graph = grimp.build_graph("hydraserve", exclude_type_checking_imports=True)
    edges = {(package(m), package(i)) for m in graph.modules for i in graph.find_modules_directly_imported_by(m)
             if package(m) != package(i)}
    return {
        "modules": len([m for m in files if not m.endswith(("__init__", "__main__"))]),
        "over_500_lines": sorted(f"{m} {n}" for m, n in lines.items() if n > 500),
        "median_function_lines": statistics.median(n for n, _ in functions),
        "longest_functions": [f"{name} {n}" for n, name in functions[::-1][:6]],
        "lines_per_package": dict(per_package.most_common()),
        "package_edges": len(edges),
        "package_cycles": sorted(f"{a} <-> {b}" for a, b in edges if (b, a) in edges and a < b),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkout", nargs="?", default=str(Path(__file__).resolve().parents[1]))
    root = Path(parser.parse_args().checkout).resolve()
    sys.path.insert(0, str(root))  # grimp imports the package to find it: this checkout's, first
    os.chdir(root)
    print(json.dumps(figures(root)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
