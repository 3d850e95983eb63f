"""Installing a package for real, fast and offline: pip into a folder, from this environment.

``--no-deps --no-build-isolation --no-index`` build with the setuptools
already installed here and fetch nothing; ``--target`` keeps the package out
of the environment, so only a process given the folder on its path sees it.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest


def pip_install(target: Path, *requirements: str, cwd: Path | None = None) -> None:
    """``pip install REQUIREMENTS`` into the folder ``target``; a failure fails the test with pip's output."""
    if importlib.util.find_spec("setuptools") is None:
        pytest.fail("building the example needs setuptools>=77 in this environment (the `test` extra)")
    command = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index"]
    command += ["--disable-pip-version-check", "--no-input", "--target", str(target), *requirements]
    result = subprocess.run(command, capture_output=True, text=True, cwd=cwd)
    assert result.returncode == 0, f"pip install failed:\n{result.stdout}\n{result.stderr}"


def environment_with(target: Path) -> dict[str, str]:
    """This process's environment with ``target`` first on PYTHONPATH."""
    path = os.pathsep.join([str(target), os.environ.get("PYTHONPATH", "")])
    return dict(os.environ, PYTHONPATH=path)


def tt_command() -> str:
    """The installed ``tt`` console script."""
    tt = shutil.which("tt", path=os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]]))
    assert tt, "the `tt` console script is not installed"
    return tt
