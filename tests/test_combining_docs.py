"""docs/combining.md: the worked example of "Weighted combinations" runs and prints what the page shows."""

import re
from pathlib import Path

PAGE = Path(__file__).parents[1] / "docs" / "combining.md"


def _section(title: str) -> str:
    """The text of one ``## title`` section of the page, up to the next ``## `` heading."""
    text = PAGE.read_text()
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end != -1 else len(text)]


def test_the_worked_example_prints_what_the_page_shows(capsys):
    section = _section("Weighted combinations")
    blocks = re.findall(r"^```(\w*)\n(.*?)^```$", section, flags=re.S | re.M)
    code = [text for language, text in blocks if language == "python"]
    shown = [text for language, text in blocks if language == "text"]
    assert len(code) == 1 and len(shown) == 1, "one example and the output it prints"
    exec(compile(code[0], str(PAGE), "exec"), {})
    printed = [line for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert printed == shown[0].strip().splitlines()
