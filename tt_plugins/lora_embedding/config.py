"""LoraEmbeddingConfig: rank, scale and targets of a low-rank embedding update."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from tt_core import AdapterConfig
from tt_core.api.config import check_target_modules
from tt_plugins import lora_options


@dataclasses.dataclass
class LoraEmbeddingConfig(AdapterConfig):
    """Add ``lora_alpha / r * (B @ A).T`` to the target embedding's weight (and to a head tied to it).

    ``r``: the rank of the update. ``lora_alpha``: its scale numerator.
    ``target_modules=None`` targets the module that ``get_input_embeddings()``
    returns. ``init_weights=True`` starts ``A`` at zero (a no-op);
    ``False`` starts both factors random, with an update about the size of the
    base rows. ``adapt_tied_modules=True`` applies the update to every module
    holding a target's weight too (a tied LM head, T5's encoder and decoder
    embeddings), with one shared state; ``False`` adapts only the targets, each
    with its own factors, as PEFT's LoRA does (what a PEFT LoRA folder loads
    as). Such an adapter cannot be merged while an unadapted module shares the
    weight.
    """

    method: ClassVar[str] = "lora_embedding"
    r: int = 8
    lora_alpha: float = 8
    target_modules: list[str] | str | None = None
    init_weights: bool = True
    adapt_tied_modules: bool = True

    def __post_init__(self) -> None:
        self.r, self.lora_alpha = lora_options.rank_and_alpha(self.r, self.lora_alpha)
        self.target_modules = check_target_modules(self.target_modules)

    @property
    def scaling(self) -> float:
        """The factor the update ``B @ A`` is multiplied by: ``lora_alpha / r``."""
        return self.lora_alpha / self.r
