"""One home per fact: the run's defaults live in ``core/defaults.py`` and every other module
imports them. An AST scan of the package finds a literal copy of one of them — a default
argument value, a keyword argument, an argparse ``default=``, a widget's initial ``value=``, or a
comparison such as ``a.margin != 2`` — and names the file and line. The probe below plants each
kind of copy in a scratch module, so the scan is seen to fail."""

from __future__ import annotations

import ast
from pathlib import Path

from napari_mias_sam.bank.indexes import INDEX_TYPES
from napari_mias_sam.core import defaults
from napari_mias_sam.method.patches import PATCH_LAYOUTS
from napari_mias_sam.method.preprocess import PREPROCESS_PRESETS, SLICE_AXES

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "napari_mias_sam"
HOME = SRC / "core" / "defaults.py"

#: Parameter, keyword, option and widget names that carry a central default, and that default.
FACTS: dict[str, object] = {
    "k": defaults.K,
    "sigma": defaults.SIGMA,
    "gamma": defaults.GAMMA,
    "batch_size": defaults.BATCH_SIZE,
    "layout": defaults.PATCH_LAYOUT,
    "index_type": defaults.INDEX_TYPE,
    "index": defaults.INDEX_TYPE,
    "knn_index": defaults.INDEX_TYPE,
    "axis": defaults.SLICE_AXIS,
    "slice_axis": defaults.SLICE_AXIS,
    "margin": defaults.DATASET_MARGIN,
    "normalisation": defaults.NORMALISATION,
    "preprocess": defaults.PREPROCESS,
}
#: Facts compared for (in)equality with a literal (``a.margin != 2``): the numeric ones. (String
#: facts are also the keys of their tables, where ``layout == "paper1024"`` says what that layout
#: does; ``k < 1`` is a bound, not a default.)
COMPARED = {"k", "sigma", "gamma", "batch_size", "margin"}
#: Widget attributes (``self.<name> = SpinBox(value=...)``) that hold a fact.
WIDGETS = {"k": "k", "batch_size": "batch_size", "ds_margin": "margin", "layout_choice": "layout",
           "preprocess": "preprocess", "normalisation": "normalisation", "gamma": "gamma"}


def _same(node: ast.AST | None, value: object) -> bool:
    if not isinstance(node, ast.Constant) or isinstance(node.value, bool) or node.value is None:
        return False
    if isinstance(value, str) or isinstance(node.value, str):
        return node.value == value
    return isinstance(node.value, (int, float)) and float(node.value) == float(value)  # type: ignore[arg-type]


def _name(node: ast.AST) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return node.attr
    return None


def literal_copies(path: Path) -> list[str]:
    """``file:line: what`` for each literal copy of a central default in ``path``."""
    tree = ast.parse(path.read_text(), str(path))
    found: list[str] = []

    def hit(node: ast.AST, what: str) -> None:
        found.append(f"{path.name}:{node.lineno}: {what}")

    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            a = node.args
            positional = a.posonlyargs + a.args
            pairs = list(zip(positional[len(positional) - len(a.defaults):], a.defaults))
            pairs += [(arg, d) for arg, d in zip(a.kwonlyargs, a.kw_defaults) if d is not None]
            for arg, d in pairs:
                if arg.arg in FACTS and _same(d, FACTS[arg.arg]):
                    hit(d, f"parameter {arg.arg}={d.value!r}")  # type: ignore[attr-defined]
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):  # dataclass fields
            if node.target.id in FACTS and _same(node.value, FACTS[node.target.id]):
                hit(node, f"field {node.target.id} = {node.value.value!r}")  # type: ignore[union-attr]
        elif isinstance(node, ast.Call):
            for kw in node.keywords:
                if kw.arg in FACTS and _same(kw.value, FACTS[kw.arg]):
                    hit(kw.value, f"keyword {kw.arg}={kw.value.value!r}")  # type: ignore[attr-defined]
            if _name(node.func) == "add_argument" and node.args and isinstance(node.args[0], ast.Constant):
                option = str(node.args[0].value).lstrip("-").replace("-", "_")
                for kw in node.keywords:
                    if kw.arg == "default" and option in FACTS and _same(kw.value, FACTS[option]):
                        hit(kw.value, f"option --{option} default={kw.value.value!r}")  # type: ignore[attr-defined]
        elif isinstance(node, ast.Assign) and isinstance(node.value, ast.Call):
            for target in node.targets:
                fact = WIDGETS.get(_name(target) or "")
                for kw in node.value.keywords if fact else ():
                    if kw.arg == "value" and _same(kw.value, FACTS[fact]):
                        hit(kw.value, f"widget {_name(target)} value={kw.value.value!r}")  # type: ignore[attr-defined]
        elif isinstance(node, ast.Compare) and all(isinstance(op, (ast.Eq, ast.NotEq)) for op in node.ops):
            sides = [node.left, *node.comparators]
            names = {_name(s) for s in sides} & COMPARED
            for fact in names:
                for s in sides:
                    if _same(s, FACTS[fact]):
                        hit(node, f"comparison of {fact} with {s.value!r}")  # type: ignore[attr-defined]
    return found


def test_no_module_copies_a_central_default():
    copies = [c for p in sorted(SRC.rglob("*.py")) if p != HOME for c in literal_copies(p)]
    assert not copies, "import these from napari_mias_sam.core.defaults instead:\n" + "\n".join(copies)


def test_the_scan_finds_each_kind_of_copy(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text(
        "def search(x, k: int = 1): ...\n"
        "def build(groups, *, layout='paper1024', index_type='flat', batch_size=4, sigma=4.0): ...\n"
        "def groups(cases, margin=2, axis='axial'): ...\n"
        "build(g, batch_size=4)\n"
        "parser.add_argument('--margin', type=int, default=2)\n"
        "parser.add_argument('--knn-index', default='flat')\n"
        "self.batch_size = SpinBox(value=4, min=1)\n"
        "extra = ['--margin'] if a.margin != 2 else []\n"
        "class Settings:\n    gamma: float = 5.0\n"
        # not copies: other values, table keys, an unrelated name
        "def other(k: int = 3, layout='mean256', axis=0): ...\n"
        "if layout == 'paper1024': pass\n"
        "n = 4\n"
    )
    found = literal_copies(probe)
    kinds = sorted(f.split(": ", 1)[1] for f in found)
    assert kinds == sorted([
        "parameter k=1", "parameter layout='paper1024'", "parameter index_type='flat'", "parameter batch_size=4",
        "parameter sigma=4.0", "parameter margin=2", "parameter axis='axial'", "keyword batch_size=4",
        "option --margin default=2", "option --knn_index default='flat'", "widget batch_size value=4",
        "comparison of margin with 2", "field gamma = 5.0",
    ])


def test_each_default_is_one_of_its_tables_choices():
    assert defaults.PATCH_LAYOUT in PATCH_LAYOUTS
    assert defaults.INDEX_TYPE in INDEX_TYPES
    assert defaults.PREPROCESS in PREPROCESS_PRESETS
    assert defaults.SLICE_AXIS in SLICE_AXES


def test_every_reader_of_the_calibration_takes_the_same_entry_of_a_k():
    """The normalisation, the regions' levels, the count of normal peaks and the slice decision
    all read ``calibration_entry``'s entry: k's own, else the largest stored k below it, else the
    smallest stored (before, two of them fell back to k = 1 and two to the largest k below)."""
    from types import SimpleNamespace

    from napari_mias_sam.bank.store import MemoryBank
    from napari_mias_sam.method.anomaly import calibration_entry
    from napari_mias_sam.method.regions import bank_levels, normal_levels, normal_peak_count
    from napari_mias_sam.pipeline.segment import slice_decision_threshold

    def entry(n: int, scale: float) -> dict:
        return {"low": scale, "high": 3 * scale, "slice_max_map": [scale * (1 + i / n) for i in range(n)],
                "slice_scores": [scale * 10 + i for i in range(n)]}

    cal = {"per_k": {"2": entry(40, 1.0), "3": entry(41, 2.0), "5": entry(42, 3.0)}}
    bank = SimpleNamespace(manifest={"calibration": cal}, path=None)
    for k, key in ((3, "3"), (4, "3"), (9, "5"), (1, "2"), (2, "2")):
        chosen = cal["per_k"][key]
        assert calibration_entry(cal, k) is chosen
        assert MemoryBank.calibration(bank, k).low == chosen["low"]  # type: ignore[arg-type]
        assert bank_levels(bank, k) == normal_levels(chosen)
        assert normal_peak_count(bank, k) == len(chosen["slice_max_map"])
        assert slice_decision_threshold(bank, k) == max(chosen["slice_scores"])  # type: ignore[arg-type]
    assert calibration_entry({"per_k": {}}, 1) is None and calibration_entry(None, 1) is None
    assert normal_peak_count(SimpleNamespace(manifest={}), 1) == 0
