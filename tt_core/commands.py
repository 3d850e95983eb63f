"""What the ``tt`` commands share (``tt_core.cli`` and ``tt demo``): their error, and a folder's model class.

Light on purpose: ``tt_core.cli`` imports it before Ctrl-C is handled.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

#: The exit status of a command given bad input.
BAD_INPUT = 2


class CommandError(Exception):
    """A failure the command explains itself: its message and exit status."""

    def __init__(self, message: str, status: int = BAD_INPUT) -> None:
        super().__init__(message)
        self.status = status


def model_class(folder: Path) -> Any:
    """The class config.json's ``architectures`` names, else ``AutoModel``."""
    import transformers

    from tt_core.disk import manifest

    config = manifest.load_json_object(folder / "config.json", (folder / "config.json").read_bytes())
    architectures = config.get("architectures")
    if isinstance(architectures, list) and architectures and isinstance(architectures[0], str):
        found = getattr(transformers, architectures[0], None)
        if isinstance(found, type) and hasattr(found, "from_pretrained"):
            return found
    return transformers.AutoModel
