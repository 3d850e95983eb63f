"""LoraEmbeddingConfig: rank, scale and targets of a low-rank embedding update."""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import ClassVar

from tt_core import AdapterConfig
from tt_core.api.config import check_target_modules
from tt_core.api.errors import ConfigError


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
        # bool is an int to Python, but r=True is certainly a mistake.
        if isinstance(self.r, bool) or not isinstance(self.r, numbers.Integral) or self.r < 1:
            raise ConfigError(f"r={self.r!r} is not a valid LoRA rank; give a whole number >= 1, e.g. r=8")
        self.r = int(self.r)
        alpha = self.lora_alpha
        if (
            isinstance(alpha, bool)
            or not isinstance(alpha, numbers.Real)
            or not math.isfinite(alpha)
            or alpha <= 0
        ):
            raise ConfigError(
                f"lora_alpha={alpha!r} is not valid; give a positive number, e.g. lora_alpha={2 * self.r} "
                "(the update is scaled by lora_alpha / r)"
            )
        # plain Python numbers, so adapter_config.json can hold them (numpy scalars cannot)
        self.lora_alpha = int(alpha) if isinstance(alpha, numbers.Integral) else float(alpha)
        self.target_modules = check_target_modules(self.target_modules)

    @property
    def scaling(self) -> float:
        """The factor the update ``B @ A`` is multiplied by: ``lora_alpha / r``."""
        return self.lora_alpha / self.r
