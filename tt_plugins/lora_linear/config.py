"""LoraLinearConfig: PEFT's LoraConfig options for LoRA on linear layers."""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Mapping
from typing import TYPE_CHECKING, ClassVar

from tt_core import AdapterConfig
from tt_core.api.config import check_target_modules
from tt_core.api.errors import ConfigError
from tt_plugins import lora_options
from tt_plugins.trainable_tokens.config import ROWS, TrainableTokensConfig

if TYPE_CHECKING:
    import torch

#: PEFT's shorthand for every linear layer but the output head.
ALL_LINEAR = "all-linear"


@dataclasses.dataclass
class LoraLinearConfig(AdapterConfig):
    """Add ``scaling * B @ A`` to the weight of each target linear layer, as PEFT's LoRA does.

    ``target_modules`` (required): module names, each matching a module whose
    full name equals it or ends with ``"." + name``; a string, which is a
    regular expression matching a full name; or ``"all-linear"``, every
    ``nn.Linear`` and ``Conv1D`` except the model's output head.
    ``r``, ``lora_alpha``: rank and scale, ``scaling = lora_alpha / r``
    (``lora_alpha / sqrt(r)`` with ``use_rslora``). ``lora_dropout``: dropout
    on the layer's input of the LoRA branch, in training only.
    ``init_lora_weights``: ``True`` (A as an ``nn.Linear`` starts, B zero: a
    no-op), ``"gaussian"`` (A normal with std 1/r, B zero) or ``False``
    (both random: the adapter changes the outputs from the start).
    ``fan_in_fan_out``: True for GPT-2's ``Conv1D`` (weight stored
    (in, out)); as in PEFT the layer's own layout decides, with a warning
    when this says otherwise. ``bias``: ``"none"`` only (the base model's
    biases stay frozen).
    ``trainable_token_indices``: as PEFT's, new rows for these token ids in
    the same adapter: a list for the input embedding (the module
    ``get_input_embeddings()`` returns, and a head tied to it), or
    ``{module name: ids}``. The rows are trainable tokens
    (:class:`~tt_plugins.trainable_tokens.TrainableTokensLayer`); activating,
    merging, saving or deleting the adapter takes its LoRA and its rows
    together.
    """

    method: ClassVar[str] = "lora_linear"
    r: int = 8
    lora_alpha: float = 8
    target_modules: list[str] | str | None = None
    lora_dropout: float = 0.0
    bias: str = "none"
    use_rslora: bool = False
    fan_in_fan_out: bool = False
    init_lora_weights: bool | str = True
    trainable_token_indices: list[int] | dict[str, list[int]] | None = None

    def __post_init__(self) -> None:
        self.r, self.lora_alpha = lora_options.rank_and_alpha(self.r, self.lora_alpha)
        dropout = self.lora_dropout
        if isinstance(dropout, bool) or not isinstance(dropout, numbers.Real) or not 0 <= dropout < 1:
            raise ConfigError(f"lora_dropout={dropout!r} is not a probability; give a number in [0, 1)")
        self.lora_dropout = float(dropout)
        if self.bias != "none":
            raise ConfigError(
                f"bias={self.bias!r} would train biases of the base model, which tt-adapters keeps frozen; "
                "only bias='none' is supported"
            )
        for flag in ("use_rslora", "fan_in_fan_out"):
            if not isinstance(getattr(self, flag), bool):
                raise ConfigError(f"{flag}={getattr(self, flag)!r} must be True or False")
        init = self.init_lora_weights
        if isinstance(init, str) and init.lower() == "gaussian":
            self.init_lora_weights = "gaussian"
        elif not isinstance(init, bool):
            raise ConfigError(
                f"init_lora_weights={init!r} is not supported; give True, False or 'gaussian' (PiSSA, OLoRA, "
                "LoftQ, EVA and the like change the base weights, which tt-adapters never does)"
            )
        if self.trainable_token_indices is not None:
            try:
                self.trainable_token_indices = self.tokens_config().token_indices
            except ConfigError as error:
                raise ConfigError(f"trainable_token_indices: {error}") from None
        if self.target_modules is None:
            raise ConfigError(
                "LoRA on linear layers needs target_modules: module names (e.g. ['q_proj', 'v_proj']), a "
                "regular expression matching full names, or 'all-linear'"
            )
        if isinstance(self.target_modules, str) and self.target_modules.lower() == ALL_LINEAR:
            self.target_modules = ALL_LINEAR
        self.target_modules = check_target_modules(self.target_modules)
        if not self.target_modules:
            raise ConfigError("target_modules is empty; name at least one linear layer, or 'all-linear'")

    @property
    def scaling(self) -> float:
        """The factor ``B @ A`` is multiplied by: ``lora_alpha / r``, or ``lora_alpha / sqrt(r)`` (rsLoRA)."""
        return self.lora_alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    def tokens_config(self) -> TrainableTokensConfig:
        """The trainable tokens of ``trainable_token_indices``, as PEFT makes them: from the base rows."""
        if self.trainable_token_indices is None:
            raise ConfigError("this LoRA has no trainable_token_indices")
        return TrainableTokensConfig(token_indices=self.trainable_token_indices)

    def relocate_tokens(
        self, moved: Mapping[int, int], tensors: dict[str, torch.Tensor], vocabulary: Mapping[str, int]
    ) -> tuple[LoraLinearConfig, dict[str, torch.Tensor]]:
        """This adapter with its trainable tokens moved (exact, as trainable tokens move); the LoRA stays.

        LoRA on a linear layer does not depend on token ids, unless the layer
        is the output head (its outputs are the tokens): such an adapter is
        refused, since its change to a token's logit adds to the base row at
        that id, which differs between the old id and the new one.
        """
        on_vocabulary = sorted({key.rsplit(".", 1)[0] for key in tensors if not key.endswith("." + ROWS)})
        on_vocabulary = [name for name in on_vocabulary if name in vocabulary]
        if on_vocabulary:
            raise ConfigError(
                f"it puts LoRA on {on_vocabulary}, whose outputs are token ids: its change to a token adds "
                "to the base row at that id, and the row at the new id is not the one at the old id, so "
                "moving the token (or growing the vocabulary) would change what the adapter does"
            )
        if self.trainable_token_indices is None:
            return self, dict(tensors)
        rows = {key: tensor for key, tensor in tensors.items() if key.endswith("." + ROWS)}
        tokens, _ = self.tokens_config().relocate_tokens(moved, rows, vocabulary)
        return dataclasses.replace(self, trainable_token_indices=tokens.token_indices), dict(tensors)

