"""The layering stated in `pinnsketch/__init__.py` holds for every import in the package.

Every module's imports are read with `ast` (module level and inside functions alike) and mapped
to the part of the package they reach: a subpackage (`pinnsketch.io`), a top-level module
(`pinnsketch.cli`) or the package root. A part may import only itself and the parts below it in
the stated order; the root, which re-exports the public surface, sits above them all.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

import pinnsketch

ROOT = Path(pinnsketch.__file__).resolve().parent
# The PDE library installs as pinnsketch.problems from the repository's problems/ folder.
PROBLEMS = ROOT.parent / "problems"
TOP = "(root)"


def stated_layers() -> list[list[str]]:
    """The layers of the package docstring's `Layers, lowest first: a -> b, c -> d` line, as lists of parts."""
    match = re.search(r"Layers, lowest first:\s*(.+?)\n\n", pinnsketch.__doc__, re.S)
    assert match, "pinnsketch/__init__.py must state its layering as 'Layers, lowest first: a -> b, c -> ...'"
    return [[name.strip().strip("`") for name in layer.split(",")]
            for layer in " ".join(match.group(1).split()).split("->")]


def rank() -> dict[str, int]:
    """Part -> index of its layer; the root above all."""
    out = {name: i for i, layer in enumerate(stated_layers()) for name in layer}
    out[TOP] = len(stated_layers())
    return out


def modules() -> dict[str, Path]:
    """Dotted name -> file of every module of the package (problems/ included)."""
    found = {}
    for base, prefix in ((ROOT, "pinnsketch"), (PROBLEMS, "pinnsketch.problems")):
        for path in sorted(base.rglob("*.py")):
            parts = list(path.relative_to(base).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join([prefix, *parts])] = path
    return found


def part_of(module: str) -> str:
    """The layer a dotted module name belongs to: its first component below `pinnsketch`."""
    pieces = module.split(".")
    return pieces[1] if len(pieces) > 1 else TOP


def imported(module: str, path: Path, known: dict[str, Path]) -> set[str]:
    """Dotted names of the pinnsketch modules `module` imports (anywhere in the file)."""
    is_package = path.name == "__init__.py"
    package = module if is_package else module.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names if alias.name.split(".")[0] == "pinnsketch")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "pinnsketch":
                continue
            # `from pinnsketch import pinn` reaches the subpackage, `from . import __version__` the package
            names = [f"{target}.{alias.name}" for alias in node.names]
            subs = [n for n in names if n in known]
            out.update(subs or [target])
            if len(subs) < len(names):
                out.add(target)
    return out


def edges() -> dict[tuple[str, str], list[str]]:
    """(importing part, imported part) -> the modules that make the edge; a part's own imports left out."""
    known = modules()
    found: dict[tuple[str, str], list[str]] = {}
    for module, path in known.items():
        for target in imported(module, path, known):
            a, b = part_of(module), part_of(target)
            if a != b:
                found.setdefault((a, b), []).append(f"{module} -> {target}")
    return found


def test_every_part_of_the_package_has_a_stated_layer():
    stated = [name for layer in stated_layers() for name in layer]
    parts = {part_of(m) for m in modules()} - {TOP}
    assert len(stated) == len(set(stated)), "a part is named twice in the layering"
    assert sorted(parts - set(stated)) == [], "add these to the layering in pinnsketch/__init__.py"
    assert sorted(set(stated) - parts) == [], "the layering names parts the package does not have"


def test_no_part_imports_its_own_layer_or_a_higher_one():
    r = rank()
    upward = {f"{a} -> {b}": where for (a, b), where in edges().items() if r[b] >= r[a]}
    assert upward == {}, "imports into the importer's own layer or a higher one"


def test_no_cycle_between_parts():
    graph: dict[str, set[str]] = {}
    for a, b in edges():
        graph.setdefault(a, set()).add(b)

    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        for nxt in graph.get(start, ()):
            if nxt == goal or (nxt not in seen and (seen.add(nxt) or reaches(nxt, goal, seen))):
                return True
        return False

    cycles = sorted(a for a in graph if reaches(a, a, set()))
    assert cycles == [], f"parts on an import cycle: {cycles}"


@pytest.mark.parametrize("source, expected", [
    ("from ..pinn.options import LBFGS\n", {("io", "pinn")}),
    ("def f():\n    import pinnsketch\n", {("io", TOP)}),
    ("from pinnsketch import pinn as ps\n", {("io", "pinn")}),
])
def test_the_scan_sees_relative_absolute_and_function_level_imports(tmp_path, source, expected):
    path = tmp_path / "writer.py"
    path.write_text(source)
    found = imported("pinnsketch.io.writer", path, modules())
    assert {(part_of("pinnsketch.io.writer"), part_of(t)) for t in found} == expected


def test_io_and_the_solver_do_not_import_each_other():
    r = rank()
    assert r["pinn"] == r["io"] and r["data"] == r["pinn"]   # one layer: neither direction is allowed
    assert r["training"] < r["io"] and r["training"] < r["data"]
