"""RowScaleConfig: which token rows to scale."""

from __future__ import annotations

import dataclasses
import numbers
from typing import ClassVar

from tt_core import AdapterConfig


@dataclasses.dataclass
class RowScaleConfig(AdapterConfig):
    """Multiply the rows ``token_indices`` of the target embedding by trainable factors.

    ``target_modules=None`` targets the module that ``get_input_embeddings()``
    returns (and the core adds a head tied to it). ``init_weights=True``
    starts every factor at 1 (a no-op); ``False`` starts them random around 1.
    """

    method: ClassVar[str] = "row_scale"
    token_indices: list[int] = dataclasses.field(default_factory=list)
    target_modules: list[str] | None = None
    init_weights: bool = True

    def __post_init__(self) -> None:
        ids = self.token_indices
        if not isinstance(ids, (list, tuple)) or not ids:
            raise ValueError(f"token_indices must be a non-empty list of token ids, got {ids!r}")
        if any(isinstance(i, bool) or not isinstance(i, numbers.Integral) or i < 0 for i in ids):
            raise ValueError(f"token_indices must be whole numbers >= 0, got {ids!r}")
        if len(set(ids)) != len(ids):
            raise ValueError(f"token_indices lists an id more than once: {ids!r}")
        # Sorted, so the layer can find an id with a binary search; factor j scales the j-th id.
        self.token_indices = sorted(int(i) for i in ids)
        if isinstance(self.target_modules, str):
            self.target_modules = [self.target_modules]
