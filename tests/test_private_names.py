"""No module of stoker reads another module's private names.

Two checks over ``src/stoker`` with ``ast``, simple on purpose:

- ``from stoker.x import _name``: a private name imported from another module. A private
  *submodule* of the importer's own package is fine (``from stoker.checkpoint import _tree``
  inside ``stoker/checkpoint/``): the package is the unit that owns it.
- ``obj._name`` where ``_name`` is a member of a stoker class (a method, a class attribute, a
  ``self._name`` assignment, a ``__slots__`` entry) defined in another module and not in this
  one. ``self._name`` on a class of this module, and torch's or the standard library's own
  private names (``torch._foreach_mul_``, ``module._orig_mod``), are not stoker's to police.
"""

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "stoker"


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _defined(node: ast.AST) -> list[str]:
    """The names ``node`` defines in a class: a method, ``_x = ...``, ``self._x = ...``, the
    entries of ``__slots__ = (...)``."""
    if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
        return [node.name]
    if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
        return [node.attr]
    if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
        return [node.id]
    if isinstance(node, ast.Assign) and any(
        isinstance(t, ast.Name) and t.id == "__slots__" for t in node.targets
    ):
        return [c.value for c in ast.walk(node.value) if isinstance(c, ast.Constant)]
    return []


def _members(tree: ast.Module) -> set[str]:
    """The private names this module's classes define."""
    classes = [n for n in ast.walk(tree) if isinstance(n, ast.ClassDef)]
    names = {name for cls in classes for node in ast.walk(cls) for name in _defined(node)}
    return {name for name in names if _private(name)}


def _violations() -> list[str]:
    trees = {path: ast.parse(path.read_text(), str(path)) for path in sorted(SRC.rglob("*.py"))}
    members = {path: _members(tree) for path, tree in trees.items()}
    stoker_members = set().union(*members.values())
    modules = {_module_name(path) for path in trees}
    found = []
    for path, tree in trees.items():
        where = path.relative_to(SRC.parent)
        package = _module_name(path) if path.name == "__init__.py" else _module_name(path.parent)
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("stoker"):
                for alias in node.names:
                    own_submodule = node.module == package and f"{package}.{alias.name}" in modules
                    if _private(alias.name) and not own_submodule:
                        found.append(
                            f"{where}:{node.lineno}: from {node.module} import {alias.name}"
                        )
            elif (
                isinstance(node, ast.Attribute)
                and node.attr in stoker_members
                and node.attr not in members[path]
            ):
                found.append(f"{where}:{node.lineno}: .{node.attr}")
    return found


def test_no_module_reads_another_modules_private_names():
    assert _violations() == []


def test_the_check_sees_a_private_read(tmp_path, monkeypatch):
    pkg = tmp_path / "stoker"
    (pkg / "a").mkdir(parents=True)
    (pkg / "a" / "__init__.py").write_text("")
    (pkg / "a" / "owner.py").write_text(
        "class Owner:\n    __slots__ = ('_size',)\n\n"
        "    def __init__(self):\n        self._count = 0\n"
    )
    (pkg / "reader.py").write_text(
        "from stoker.a.owner import _helper\n\ndef read(o):\n    return o._count, o._size\n"
    )
    monkeypatch.setitem(globals(), "SRC", pkg)
    assert _violations() == [
        "stoker/reader.py:1: from stoker.a.owner import _helper",
        "stoker/reader.py:4: ._count",
        "stoker/reader.py:4: ._size",
    ]
