"""The widget's helpers talk to it through a small explicit interface: :class:`BankMixin` uses only
what ``BankHost`` declares, :class:`LiveController` only what ``LiveHost`` declares, and the widget
provides every member of both. Read from the source (no display needed)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

VIEWER = Path(__file__).resolve().parents[2] / "src" / "napari_mias_sam" / "viewer"


def _class(path: Path, name: str) -> ast.ClassDef:
    (cls,) = [n for n in ast.parse(path.read_text()).body if isinstance(n, ast.ClassDef) and n.name == name]
    return cls


def _protocol_members(path: Path, name: str) -> set[str]:
    cls = _class(path, name)
    members = {n.target.id for n in cls.body if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name)}
    return members | {n.name for n in cls.body if isinstance(n, ast.FunctionDef)}


def _attributes_of(tree: ast.AST, base: str, sub: str | None = None) -> set[str]:
    """Attribute names read or written on ``base`` (``self``), or on ``base.sub`` (``self.w``)."""
    out = set()
    for node in ast.walk(tree):
        if not isinstance(node, ast.Attribute):
            continue
        v = node.value
        if sub is None and isinstance(v, ast.Name) and v.id == base:
            out.add(node.attr)
        elif sub is not None and isinstance(v, ast.Attribute) and v.attr == sub and isinstance(v.value, ast.Name) and v.value.id == base:
            out.add(node.attr)
    return out


def _provided_by_widget() -> set[str]:
    cls = _class(VIEWER / "widget.py", "MiasSamWidget")
    names = {n.name for n in cls.body if isinstance(n, ast.FunctionDef)}
    for path, base in ((VIEWER / "widget_dataset.py", "DatasetMixin"), (VIEWER / "widget_files.py", "FilesMixin")):
        names |= {n.name for n in _class(path, base).body if isinstance(n, ast.FunctionDef)}  # the widget's other bases
    for node in ast.walk(cls):
        if isinstance(node, (ast.Assign, ast.AnnAssign)):
            for t in node.targets if isinstance(node, ast.Assign) else [node.target]:
                if isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name) and t.value.id == "self":
                    names.add(t.attr)
    return names | {"viewer"}


def test_bank_mixin_uses_only_the_bank_host_interface():
    path = VIEWER / "widget_bank.py"
    host = _protocol_members(path, "BankHost")
    mixin = _class(path, "BankMixin")
    own = {n.name for n in mixin.body if isinstance(n, ast.FunctionDef)}
    used = _attributes_of(mixin, "self") - own
    assert used <= host, f"BankMixin uses widget members BankHost does not declare: {sorted(used - host)}"
    assert not [m for m in host if m.startswith("_")]


@pytest.mark.parametrize("module, host_name, controller", [("widget_live.py", "LiveHost", "LiveController"),
                                                         ("widget_review.py", "ReviewHost", "ReviewController")])
def test_controllers_use_only_their_host_interface(module, host_name, controller):
    path = VIEWER / module
    host = _protocol_members(path, host_name)
    ctrl = _class(path, controller)
    used = _attributes_of(ctrl, "self", "w") | _attributes_of(ctrl, "widget")
    assert used <= host, f"{controller} uses widget members {host_name} does not declare: {sorted(used - host)}"
    assert not [m for m in host if m.startswith("_")]


def test_the_widget_provides_every_host_interface():
    provided = _provided_by_widget()
    for path, proto in ((VIEWER / "widget_bank.py", "BankHost"), (VIEWER / "widget_live.py", "LiveHost"),
                        (VIEWER / "widget_review.py", "ReviewHost")):
        missing = _protocol_members(path, proto) - provided
        assert not missing, f"MiasSamWidget lacks {proto} members: {sorted(missing)}"

