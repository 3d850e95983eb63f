"""The names a plugin's adapter state uses, in one place (they live in :mod:`tt_core.tensors`).

Kept for plugin authors (docs/plugins.md, examples/tt-row-scale):
``from tt_core.layer import output_writable`` works as it always has.
"""

from tt_core.tensors.kernels import add_low_rank, replace_columns
from tt_core.tensors.state import (
    AdapterState,
    AppliedAdapters,
    embedding_scale,
    is_conv1d,
    output_writable,
    scaled,
)
from tt_core.tensors.wrapper import AdapterLayer

__all__ = [
    "AdapterLayer",
    "AdapterState",
    "AppliedAdapters",
    "add_low_rank",
    "embedding_scale",
    "is_conv1d",
    "output_writable",
    "replace_columns",
    "scaled",
]
