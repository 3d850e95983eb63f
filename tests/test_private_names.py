"""No module of tt_core or tt_plugins reads another module's underscore names.

A name with a leading underscore is its module's own business; a module that
needs another's takes a public name (or the small public type, such as
:class:`tt_core.records.AdapterRecord`) instead. Names of other libraries
(``nn.Module._buffers``, ``os._exit``) are not tt_core's to rename and are not
checked.
"""

from __future__ import annotations

import ast
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("tt_core", "tt_plugins")
# PyTorch's own names (``module._parameters``, ``tensor._version``), which tt_core reads as torch does.
TORCH_NAMES = frozenset(dir(nn.Module()) + dir(torch.empty(0)))


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _sources() -> dict[str, ast.Module]:
    trees = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            trees[str(path.relative_to(ROOT))] = ast.parse(path.read_text(), filename=str(path))
    return trees


def _defined(tree: ast.Module) -> set[str]:
    """The underscore names a module defines: functions, classes, attributes and assignments."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            names.add(node.attr)
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Attribute):
            names.add(node.target.attr)
    return {name for name in names if _private(name)}


def test_no_module_reads_another_modules_underscore_names():
    trees = _sources()
    owners: dict[str, set[str]] = {}
    for module, tree in trees.items():
        for name in _defined(tree):
            owners.setdefault(name, set()).add(module)
    found = []
    for module, tree in trees.items():
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in PACKAGES:
                found += [f"{module}:{node.lineno} imports {a.name}" for a in node.names if _private(a.name)]
            elif isinstance(node, ast.Attribute) and node.attr in owners and node.attr not in TORCH_NAMES:
                mine = isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")
                if not mine and module not in owners[node.attr]:
                    found.append(f"{module}:{node.lineno} reads .{node.attr} of {sorted(owners[node.attr])}")
    assert not found, "\n".join(found)
