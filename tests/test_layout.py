"""The package layout and its rules: every package folder ships in the wheel; the import-linter
contracts (the layers, and the Qt fence) cover every package and compute module; .ci/run runs them
and the README's test command; no import cycle between modules (lazy imports included); at most 12
modules at the package's top level; no module imports another module's private name."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "napari_mias_sam"
SRC = ROOT / "src" / PACKAGE
#: The only modules that may import napari, Qt or magicgui (the napari-facing layer).
QT_MODULES = re.compile(r"^napari_mias_sam\.viewer(\.(widget\w*|reader|writer|samples))?$")


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _modules() -> list[str]:
    out = []
    for p in SRC.rglob("*.py"):
        parts = list(p.relative_to(SRC.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out.append(".".join(parts))
    return sorted(out)


def test_every_package_folder_is_listed_in_pyproject():
    listed = set(_pyproject()["tool"]["setuptools"]["packages"])
    src = ROOT / "src"
    found = {".".join(p.parent.relative_to(src).parts) for p in src.rglob("__init__.py")}
    assert found <= listed, f"add to [tool.setuptools] packages in pyproject.toml: {sorted(found - listed)}"


def test_the_qt_contract_covers_every_compute_module():
    (contract,) = [c for c in _pyproject()["tool"]["importlinter"]["contracts"]
                   if c["type"] == "forbidden" and "qtpy" in c["forbidden_modules"]]
    assert {"qtpy", "magicgui", "napari"} <= set(contract["forbidden_modules"])
    sources = contract["source_modules"]
    uncovered = [m for m in _modules() if m != PACKAGE and not QT_MODULES.match(m)
                 and not any(m == s or m.startswith(s + ".") for s in sources)]
    assert not uncovered, f"add to the import-linter contract's source_modules in pyproject.toml: {uncovered}"
    assert not [s for s in sources if QT_MODULES.match(s)]


def test_ci_runs_the_contract_and_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    (command,) = [line for line in readme.splitlines() if "pytest" in line and line.startswith("python3 -m venv")]
    assert "lint-imports" in command
    assert command in (ROOT / ".ci" / "run").read_text().splitlines()


def _where(path: Path) -> str:
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else path.name


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def private_imports(path: Path) -> list[str]:
    """``file:line: what`` for each private name ``path`` takes from a package module: ``from
    .x import _y``, ``from napari_mias_sam.x import _y``, and ``m._y`` where ``m`` is a package
    module bound by an import."""
    tree = ast.parse(path.read_text(), str(path))
    found, modules = [], set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            ours = node.level > 0 or (node.module or "").split(".")[0] == PACKAGE
            if not ours:
                continue
            for a in node.names:
                if _private(a.name):
                    found.append(f"{_where(path)}:{node.lineno}: imports {a.name} from {'.' * node.level}{node.module or ''}")
                else:
                    modules.add(a.asname or a.name)  # may be a module (from . import bank)
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] == PACKAGE:
                    modules.add(a.asname or a.name.split(".")[0])
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and _private(node.attr):
            base = node.value
            while isinstance(base, ast.Attribute):
                base = base.value
            if isinstance(base, ast.Name) and base.id in modules and base.id != "self":
                found.append(f"{_where(path)}:{node.lineno}: uses {ast.unparse(node)}")
    return found


def test_no_module_imports_another_modules_private_name():
    files = sorted((ROOT / "src" / PACKAGE).rglob("*.py")) + sorted((ROOT / "benchmarks").glob("*.py"))
    found = [line for f in files for line in private_imports(f)]
    assert not found, "make these names public or move them:\n" + "\n".join(found)


def test_the_scan_finds_private_imports(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("from .bank.store import _hidden, public\nfrom napari_mias_sam import io as mio\n"
                     "from os import _exit\nx = mio._secret + mio.__name__\n")
    found = private_imports(probe)
    assert len(found) == 2 and "_hidden" in found[0] and "mio._secret" in found[1], found


def test_long_modules_say_why_in_their_docstring():
    """No module over about 450 lines without a reason ("Size: ...") in its docstring."""
    long = []
    for p in sorted(SRC.rglob("*.py")):
        text = p.read_text()
        if text.count("\n") > 460 and "Size:" not in (ast.get_docstring(ast.parse(text)) or ""):
            long.append(f"{p.relative_to(ROOT)} ({text.count(chr(10))} lines)")
    assert not long, "split these modules or give the reason in their docstring ('Size: ...'): " + ", ".join(long)


def import_cycles(package: str) -> list[list[str]]:
    """The import cycles between the modules of ``package`` (strongly connected components of its
    import graph, imports inside functions included), each as a sorted list of module names."""
    import grimp

    graph = grimp.build_graph(package, cache_dir=None)
    edges = {m: sorted(graph.find_modules_directly_imported_by(m)) for m in graph.modules}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's algorithm
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for m in sorted(edges):
        if m not in index:
            visit(m)
    return cycles


def test_no_import_cycle_between_modules():
    cycles = import_cycles(PACKAGE)
    assert not cycles, "break these import cycles (move the shared fact down a layer):\n" + "\n".join(map(str, cycles))


def test_the_cycle_finder_finds_a_lazy_cycle(tmp_path, monkeypatch):
    pkg = tmp_path / "cyclic_probe"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from . import b\n")
    (pkg / "b.py").write_text("def f():\n    from .c import g\n")
    (pkg / "c.py").write_text("def g():\n    from . import a\n")
    (pkg / "d.py").write_text("from . import a\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert import_cycles("cyclic_probe") == [["cyclic_probe.a", "cyclic_probe.b", "cyclic_probe.c"]]


def test_at_most_twelve_modules_at_the_top_level():
    top = sorted(p.name for p in SRC.glob("*.py"))
    assert len(top) <= 12, f"{len(top)} modules at the package's top level; move them into a layer package: {top}"


def test_the_layers_contract_names_every_package():
    (contract,) = [c for c in _pyproject()["tool"]["importlinter"]["contracts"] if c["type"] == "layers"]
    named = {name.strip() for layer in contract["layers"] for name in layer.split("|")}
    packages = {f"{PACKAGE}.{p.parent.name}" for p in SRC.glob("*/__init__.py")}
    assert packages == named, f"the layers contract in pyproject.toml and the packages differ: {sorted(packages ^ named)}"


def test_only_scale_imports_dask_distributed():
    """The Dask contract covers every package but scale/ and cli/ (which imports scale/ for --dask)."""
    (contract,) = [c for c in _pyproject()["tool"]["importlinter"]["contracts"]
                   if c["type"] == "forbidden" and "distributed" in c["forbidden_modules"]]
    packages = {f"{PACKAGE}.{p.parent.name}" for p in SRC.glob("*/__init__.py")}
    assert packages - set(contract["source_modules"]) == {f"{PACKAGE}.scale", f"{PACKAGE}.cli"}
