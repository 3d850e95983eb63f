"""The wrapper put around one base module, and the adapter state it stacks."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn


class AdapterState(nn.Module):
    """One adapter's parameters for one base weight.

    Tied modules (an embedding and the LM head sharing its weight) hold the
    *same* state object, so its parameters exist once. A method plugin
    subclasses this and implements the two forward rules below; each takes the
    output computed so far (the base output, already changed by the adapters
    earlier in the stack) and returns it changed by this adapter, as if the
    weight had been ``adapter(W_so_far)``.
    """

    #: True when the adapter adds to the weight (adds commute with each other);
    #: False when it replaces the rows given by :meth:`touched_rows`.
    additive: ClassVar[bool] = False

    def __init__(self) -> None:
        super().__init__()
        self.merged = False

    def touched_rows(self) -> torch.Tensor | None:
        """The weight rows this adapter changes, or ``None`` for all of them."""
        return None

    def adapt_rows(self, token_ids: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """What this adapter makes of the weight rows ``token_ids``, given their current ``rows``.

        Differentiable; used where a later adapter needs the rows it overwrites.
        """
        raise NotImplementedError(f"{type(self).__name__} does not implement adapt_rows")

    def embed(self, input_ids: torch.Tensor, output: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
        """Embedding rule: ``output`` holds the rows looked up for ``input_ids``."""
        raise NotImplementedError(f"{type(self).__name__} cannot adapt an embedding")

    def project(
        self,
        hidden: torch.Tensor,
        output: torch.Tensor,
        base_layer: nn.Module,
        earlier: list[AdapterState],
    ) -> torch.Tensor:
        """Linear rule: ``output`` holds ``hidden @ W.T + bias`` (logits for an LM head).

        ``earlier`` are the unmerged adapters applied before this one, in order,
        for a method that needs the rows as they were before it (see :meth:`adapt_rows`).
        """
        raise NotImplementedError(f"{type(self).__name__} cannot adapt a linear layer")

    def merge_into(self, weight: torch.Tensor) -> None:
        """Fold this adapter into ``weight`` in place, keeping what :meth:`unmerge_from` needs.

        The core's default ``merge`` hook calls this; a plugin may answer the
        hook itself instead.
        """
        raise NotImplementedError(f"{type(self).__name__} cannot be merged: implement merge_into")

    def unmerge_from(self, weight: torch.Tensor) -> None:
        """Undo :meth:`merge_into` on ``weight``."""
        raise NotImplementedError(f"{type(self).__name__} cannot be unmerged: implement unmerge_from")

    def commutes_with(self, other: AdapterState) -> bool:
        """Whether applying the two adapters in either order gives the same weight."""
        if self.additive and other.additive:
            return True
        mine, theirs = self.touched_rows(), other.touched_rows()
        if mine is None or theirs is None:
            return False
        return not bool(torch.isin(mine, theirs.to(mine.device)).any())


def embedding_scale(base_layer: nn.Module) -> torch.Tensor | float | None:
    """The factor a scaled embedding multiplies its rows by (Gemma's ``embed_scale``)."""
    return getattr(base_layer, "embed_scale", None)


class AdapterLayer(nn.Module):
    """Wraps one base module (``nn.Embedding`` or ``nn.Linear``) and applies a stack of adapters.

    ``active_adapters`` is the stack, in order; adapters merged into the base
    weight are skipped, since the base module already applies them.
    """

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.check_wrappable("module", base_layer)
        self.base_layer: nn.Module = base_layer
        self.adapters = nn.ModuleDict()
        self.active_adapters: list[str] = []

    @staticmethod
    def check_wrappable(name: str, base_layer: nn.Module) -> None:
        """Raise unless ``base_layer`` is a module kind the wrapper knows how to adapt."""
        if not isinstance(base_layer, (nn.Embedding, nn.Linear)):
            raise ValueError(
                f"{name} is a {type(base_layer).__name__}; tt-adapters wraps nn.Embedding and nn.Linear "
                "modules only. Target the token embedding (or a head tied to it)."
            )

    @property
    def is_embedding(self) -> bool:
        return isinstance(self.base_layer, nn.Embedding)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        output = self.base_layer(x, *args, **kwargs)
        applied: list[AdapterState] = []
        for name in self.active_adapters:
            state: AdapterState = self.adapters[name]  # type: ignore[assignment]
            if state.merged:
                continue
            if self.is_embedding:
                output = state.embed(x, output, self.base_layer)
            else:
                output = state.project(x, output, self.base_layer, applied)
            applied.append(state)
        return output

    def __getattr__(self, name: str) -> Any:
        # Attributes the model reads from its embedding (weight, padding_idx,
        # embed_scale, num_embeddings...) come from the base module.
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_layer":
                raise
            return getattr(self.base_layer, name)

    def extra_repr(self) -> str:
        return f"active={self.active_adapters}"
