"""The aten ops that make the host wait for a value computed on the device."""

from __future__ import annotations

from collections.abc import Iterable

# Each reads a device tensor on the host: a value (item, _local_scalar_dense, is_nonzero, equal) or a
# size that depends on values (nonzero, unique*, masked_select, repeat_interleave without output_size).
HOST_READING_OPS = frozenset(
    {
        "_local_scalar_dense",
        "item",
        "is_nonzero",
        "equal",
        "nonzero",
        "nonzero_static",
        "argwhere",
        "_unique",
        "_unique2",
        "unique_dim",
        "unique_consecutive",
        "masked_select",
        "masked_scatter",
        "repeat_interleave",
    }
)


def host_reads(ops: Iterable[str]) -> list[str]:
    """Those of ``ops`` (``"aten.name.overload"`` strings, as OpRecorder and FX graphs name them)
    that read a device value on the host."""
    return [op for op in ops if op.startswith("aten.") and op.split(".")[1] in HOST_READING_OPS]
