"""The README's tour runs as written."""

import re
from pathlib import Path


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
