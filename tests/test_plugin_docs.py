"""docs/plugins.md, followed as a reader follows it, ends with an installed plugin that passes the kit.

The test copies every block whose first line is ``# file: tt-row-scale/PATH``
into a fresh folder (a ``(continued)`` block is appended to its file), then
runs the page's shell commands from the folder holding it, in order: ``pip
install`` (into a temporary folder, offline, from this environment), ``tt
plugins`` (its output must be the one the page shows) and ``pytest`` (the
conformance kit). The page's other Python blocks run too, against the
installed package. The files must also be those of examples/tt-row-scale,
so the page and the example cannot drift apart.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from installing import environment_with, pip_install, tt_command

from tt_core import testing

ROOT = Path(__file__).parents[1]
PAGE = ROOT / "docs" / "plugins.md"
EXAMPLE = ROOT / "examples" / "tt-row-scale"
FILE_MARK = re.compile(r"# file: (tt-row-scale/\S+)( \(continued\))?\n")


def _blocks() -> list[tuple[str, str]]:
    """(language, text) of each fenced block of the page, in order."""
    return re.findall(r"^```(\w*)\n(.*?)^```$", PAGE.read_text(), flags=re.S | re.M)


def _files() -> dict[str, str]:
    """The package's files as the page gives them, by path under the folder holding tt-row-scale/."""
    files: dict[str, str] = {}
    for _, text in _blocks():
        mark = FILE_MARK.match(text)
        if mark is None:
            continue
        path, continued = mark.groups()
        if continued:
            assert path in files, f"{path}: a (continued) block comes before the file's first block"
            files[path] += "\n" + text
        else:
            assert path not in files, f"{path}: two blocks begin it; mark the later ones (continued)"
            files[path] = text
    return files


def _commands() -> list[tuple[str, str | None]]:
    """Each shell command of the page, with the ``text`` block that follows its block (its output)."""
    blocks = _blocks()
    commands = []
    for index, (language, text) in enumerate(blocks):
        if language != "bash":
            continue
        following = blocks[index + 1] if index + 1 < len(blocks) else ("", "")
        output = following[1] if following[0] == "text" else None
        for line in text.splitlines():
            command = line.split("#", 1)[0].strip()
            if command:
                commands.append((command, output))
    return commands


def _code_lines(text: str) -> list[str]:
    """The lines that carry code: the ones a reader pasting the blocks must reproduce."""
    return [line.rstrip() for line in text.splitlines() if line.strip() and not FILE_MARK.match(line + "\n")]


@pytest.fixture(scope="module")
def reader(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A folder holding tt-row-scale/ as written from the page, and the folder pip installed it into."""
    work = tmp_path_factory.mktemp("reader")
    for path, text in _files().items():
        (work / path).parent.mkdir(parents=True, exist_ok=True)
        (work / path).write_text(text)
    site = tmp_path_factory.mktemp("site")
    installs = [command for command, _ in _commands() if command.startswith("pip install ")]
    assert installs == ["pip install ./tt-row-scale"], "the page installs the package it builds, once"
    pip_install(site, *installs[0].split()[2:], cwd=work)
    return {"work": work, "site": site}


def test_the_page_gives_every_file_of_the_example_package():
    files = _files()
    example = {
        f"tt-row-scale/{path.relative_to(EXAMPLE).as_posix()}": path
        for path in EXAMPLE.rglob("*")
        if path.suffix in (".py", ".toml") and "build" not in path.parts and ".egg-info" not in str(path)
    }
    assert sorted(files) == sorted(example)
    for path, text in files.items():
        assert _code_lines(text) == _code_lines(example[path].read_text()), f"{path} differs from the example"


def test_the_installed_package_is_the_pages(reader):
    (info,) = reader["site"].glob("tt_row_scale-*.dist-info")
    assert "Name: tt-row-scale\nVersion: 0.1.0\n" in (info / "METADATA").read_text()
    assert "[tt_core.plugins]\nrow_scale = tt_row_scale.plugin" in (info / "entry_points.txt").read_text()


def test_the_documented_commands_give_the_documented_output(reader):
    commands = [command for command, _ in _commands()]
    assert set(commands) == {"pip install ./tt-row-scale", "tt plugins", "pytest tt-row-scale/tests"}
    env = environment_with(reader["site"])
    for command, documented in _commands():
        program, *args = command.split()
        if program == "tt":
            result = subprocess.run([tt_command(), *args], capture_output=True, text=True, env=env)
            assert result.returncode == 0, result.stdout + result.stderr
            assert documented is not None, f"the page shows no output of `{command}`"
            assert result.stdout == documented, f"`{command}` prints:\n{result.stdout}"
        elif program == "pytest":
            run = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args]
            result = subprocess.run(run, capture_output=True, text=True, env=env, cwd=reader["work"])
            checks = len(testing.CHECKS) * len(testing.FAMILIES)
            report = result.stdout + result.stderr
            assert result.returncode == 0 and f"{checks} passed" in result.stdout, report


def test_the_usage_snippets_run_on_the_installed_package(reader):
    snippets = [text for language, text in _blocks() if language == "python" and not FILE_MARK.match(text)]
    assert snippets, "the page shows how to use the method"
    probe = "\nimport tt_row_scale\nprint('imported from', tt_row_scale.__file__)\n"
    for snippet in snippets:
        result = subprocess.run(
            [sys.executable, "-c", snippet + probe],
            capture_output=True,
            text=True,
            env=environment_with(reader["site"]),
            cwd=reader["work"],
        )
        assert result.returncode == 0, f"{snippet}\n{result.stderr}"
        assert f"imported from {reader['site']}" in result.stdout
