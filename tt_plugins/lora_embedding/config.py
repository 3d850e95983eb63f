"""LoraEmbeddingConfig: rank, scale and targets of a low-rank embedding update."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import TYPE_CHECKING, ClassVar

from tt_core import AdapterConfig
from tt_core.api.config import check_target_modules
from tt_core.api.errors import ConfigError
from tt_plugins import lora_options

if TYPE_CHECKING:
    import torch


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

    def relocate_tokens(
        self, moved: Mapping[int, int], tensors: dict[str, torch.Tensor], vocabulary: Mapping[str, int]
    ) -> tuple[LoraEmbeddingConfig, dict[str, torch.Tensor]]:
        """Refused: a token's row is the base row at its id plus this update, so a move is not exact.

        The row at the new id is another row of the base (a row the resize
        filled) than the one at the old id, and the update covers every row of
        the vocabulary it was trained on, so it cannot follow a token alone.
        """
        raise ConfigError(
            "LoRA on the embedding adds to the base row at each id, and the base row at a new id is not the "
            "one at the old id, so its tokens cannot move (nor its vocabulary grow) exactly; load it alone, "
            "or with adapters whose tokens do not collide, without relocate=True"
        )

