"""TrainableTokensConfig: which token rows to train."""

from __future__ import annotations

import dataclasses
import numbers
from typing import Any, ClassVar

from tt_core import AdapterConfig
from tt_core.config import check_target_modules

TokenIndices = list[int] | dict[str, list[int]]


def _clean_indices(values: Any, where: str) -> list[int]:
    if hasattr(values, "tolist"):  # a tensor or an array
        values = values.tolist()
    if isinstance(values, (str, bytes)) or not hasattr(values, "__iter__"):
        raise ValueError(f"token_indices{where} must be a list of token ids, got {values!r}")
    values = list(values)
    if not values:
        raise ValueError(
            f"token_indices{where} is empty; give the ids of the tokens to train, e.g. "
            "tokenizer.convert_tokens_to_ids(new_tokens)"
        )
    not_ints = [v for v in values if isinstance(v, bool) or not isinstance(v, numbers.Integral)]
    if not_ints:
        raise ValueError(f"token_indices{where} must be integers; these are not: {not_ints[:10]}")
    ids = [int(v) for v in values]
    negative = [v for v in ids if v < 0]
    if negative:
        raise ValueError(
            f"token_indices{where} has negative ids {negative[:10]}; ids count from 0 "
            "(an unknown token converts to None or -1: check the token was added to the tokenizer)"
        )
    seen: set[int] = set()
    duplicates = sorted({v for v in ids if v in seen or seen.add(v)})  # type: ignore[func-returns-value]
    if duplicates:
        raise ValueError(
            f"token_indices{where} lists ids {duplicates[:10]} more than once; give each id once"
        )
    return ids


@dataclasses.dataclass
class TrainableTokensConfig(AdapterConfig):
    """Train only the rows ``token_indices`` of the target embedding (and of a head tied to it).

    ``token_indices``: a list of token ids, or ``{module name: ids}`` to adapt
    several embeddings with different rows. ``target_modules=None`` targets the
    module that ``get_input_embeddings()`` returns. ``init_weights=True``
    starts from the base rows (a no-op); ``False`` starts from random rows.
    """

    method: ClassVar[str] = "trainable_tokens"
    token_indices: TokenIndices = dataclasses.field(default_factory=list)
    target_modules: list[str] | str | None = None
    init_weights: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.token_indices, dict):
            if not self.token_indices:
                raise ValueError("token_indices is an empty dict; map module names to token ids")
            self.token_indices = {
                str(name): _clean_indices(ids, f"[{name!r}]") for name, ids in self.token_indices.items()
            }
        else:
            self.token_indices = _clean_indices(self.token_indices, "")
        self.target_modules = check_target_modules(self.target_modules)

    def indices_for(self, target_name: str) -> list[int] | None:
        """The ids for one target module (a dict key may be a suffix of its full name)."""
        if not isinstance(self.token_indices, dict):
            return self.token_indices
        for key, ids in self.token_indices.items():
            if target_name == key or target_name.endswith("." + key):
                return ids
        return None
