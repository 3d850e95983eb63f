"""The floors of tt_core hold (pyproject.toml's import-linter contracts), and a break of one is caught.

``tox -e lint`` runs ``lint-imports``; these tests run it too, on the tree and
on copies of it with one deliberate upward import, so the contracts are shown
to fail when a lower floor imports a higher one.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("importlinter")

ROOT = Path(__file__).resolve().parents[1]
LINT = "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())"


def _lint(tree: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    return subprocess.run(
        [sys.executable, "-c", LINT, "--no-cache", "--no-logo"],
        cwd=tree,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def _copy(tmp_path: Path) -> Path:
    tree = tmp_path / "tree"
    ignore = shutil.ignore_patterns("__pycache__")
    for package in ("tt_core", "tt_plugins"):
        shutil.copytree(ROOT / package, tree / package, ignore=ignore)
    shutil.copy(ROOT / "pyproject.toml", tree / "pyproject.toml")
    return tree


def _append(path: Path, line: str) -> None:
    path.write_text(path.read_text() + "\n" + line + "\n")


def test_the_tree_keeps_every_contract():
    result = _lint(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


@pytest.mark.parametrize(
    ("module", "line", "contract", "chain"),
    [
        # the plugin API (bottom floor) importing the model facade
        ("tt_core/api/config.py", "import tt_core.model", "floors", "tt_core.api.config -> tt_core.model"),
        # the tensor floor importing the merge engine
        (
            "tt_core/tensors/wrapper.py",
            "from tt_core import merging",
            "floors",
            "tt_core.tensors.wrapper -> tt_core.merging",
        ),
        # a format importing the facade
        (
            "tt_core/formats/native.py",
            "import tt_core.model",
            "floors",
            "tt_core.formats.native -> tt_core.model",
        ),
        # the core importing a plugin
        (
            "tt_core/records.py",
            "import tt_plugins.trainable_tokens",
            "tt_core never imports tt_plugins",
            "tt_core.records -> tt_plugins.trainable_tokens",
        ),
        # a plugin importing an I/O module
        (
            "tt_plugins/lora_embedding/plugin.py",
            "from tt_core.formats import peft",
            "a plugin imports only the plugin API and the tensor floor",
            "tt_plugins.lora_embedding.plugin -> tt_core.formats.peft",
        ),
    ],
)
def test_an_upward_import_breaks_a_contract(tmp_path, module, line, contract, chain):
    tree = _copy(tmp_path)
    _append(tree / module, line)
    result = _lint(tree)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "BROKEN" in result.stdout
    assert chain in result.stdout, result.stdout
    if contract != "floors":
        assert contract in result.stdout


def test_an_import_cycle_breaks_a_contract(tmp_path):
    tree = _copy(tmp_path)
    # the cycle this layout removed: tokens.py importing the config that imports it
    _append(tree / "tt_plugins/trainable_tokens/tokens.py", "import tt_plugins.trainable_tokens.config")
    result = _lint(tree)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "no import cycle among the modules of any package BROKEN" in result.stdout
    assert ".tokens -> .config" in result.stdout


def test_an_import_for_type_checking_only_is_not_counted(tmp_path):
    tree = _copy(tmp_path)
    _append(
        tree / "tt_core/api/config.py",
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import tt_core.model",
    )
    result = _lint(tree)
    assert result.returncode == 0, result.stdout + result.stderr
