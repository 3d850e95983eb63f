"""TrainableTokensConfig: which token rows to train."""

from __future__ import annotations

import dataclasses
import numbers
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any, ClassVar

from tt_core import AdapterConfig
from tt_core.api.config import check_target_modules
from tt_core.api.errors import ArgumentTypeError, ConfigError
from tt_plugins.trainable_tokens.tokens import add_tokens_for, token_ids

if TYPE_CHECKING:
    import torch

TokenIndices = list[int] | dict[str, list[int]]
ROWS = "trainable_tokens_rows"  # the name of a state's rows, saved as <target>.trainable_tokens_rows


def _clean_indices(values: Any, where: str) -> list[int]:
    if hasattr(values, "tolist"):  # a tensor or an array
        values = values.tolist()
    if isinstance(values, (str, bytes)) or not hasattr(values, "__iter__"):
        raise ConfigError(f"token_indices{where} must be a list of token ids, got {values!r}")
    values = list(values)
    if not values:
        raise ConfigError(
            f"token_indices{where} is empty; give the ids of the tokens to train, e.g. "
            "tokenizer.convert_tokens_to_ids(new_tokens)"
        )
    not_ints = [v for v in values if isinstance(v, bool) or not isinstance(v, numbers.Integral)]
    if not_ints:
        raise ConfigError(f"token_indices{where} must be integers; these are not: {not_ints[:10]}")
    ids = [int(v) for v in values]
    negative = [v for v in ids if v < 0]
    if negative:
        raise ConfigError(
            f"token_indices{where} has negative ids {negative[:10]}; ids count from 0 "
            "(an unknown token converts to None or -1: check the token was added to the tokenizer)"
        )
    seen: set[int] = set()
    duplicates = sorted({v for v in ids if v in seen or seen.add(v)})  # type: ignore[func-returns-value]
    if duplicates:
        raise ConfigError(
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
                raise ConfigError("token_indices is an empty dict; map module names to token ids")
            self.token_indices = {
                str(name): _clean_indices(ids, f"[{name!r}]") for name, ids in self.token_indices.items()
            }
        else:
            self.token_indices = _clean_indices(self.token_indices, "")
        self.target_modules = check_target_modules(self.target_modules)

    @classmethod
    def from_tokens(cls, tokens: Iterable[Any], tokenizer: Any, **kwargs: Any) -> TrainableTokensConfig:
        """A config training the rows of ``tokens``, strings that are already single tokens of ``tokenizer``.

        ``TrainableTokensConfig.from_tokens(["<covid19>", "[SEP]"], tokenizer, init_weights=False)``.
        Strings the tokenizer splits are an error naming them; add those with
        :meth:`add_new_tokens`. ``kwargs`` are the config's other fields.
        """
        if "token_indices" in kwargs:
            raise ArgumentTypeError("from_tokens() takes the ids from tokens; drop token_indices")
        return cls(token_indices=token_ids(tokenizer, tokens), **kwargs)

    @classmethod
    def add_new_tokens(
        cls,
        model: Any,
        tokenizer: Any,
        tokens: Iterable[Any] | Mapping[Any, str | None],
        *,
        special_tokens: bool = False,
        **kwargs: Any,
    ) -> TrainableTokensConfig:
        """Add new tokens to ``tokenizer`` and ``model``, each row the mean of its old word-pieces.

        One call for: ``tokenizer.add_tokens``, ``model.resize_token_embeddings``
        (a tied head stays tied), initialising the new rows, and this config.
        ``tokens``: a list, or ``{token: description}`` to start a row from
        the description's pieces. Tokens the tokenizer already has are an
        error (see :func:`add_new_tokens`).
        """
        return add_tokens_for(cls, model, tokenizer, tokens, special_tokens, kwargs)

    def indices_for(self, target_name: str) -> list[int] | None:
        """The ids for one target module (a dict key may be a suffix of its full name)."""
        if not isinstance(self.token_indices, dict):
            return self.token_indices
        for key, ids in self.token_indices.items():
            if self._names(key, target_name):
                return ids
        return None

    def relocate_tokens(
        self, moved: Mapping[int, int], tensors: dict[str, torch.Tensor], vocabulary: Mapping[str, int]
    ) -> tuple[TrainableTokensConfig, dict[str, torch.Tensor]]:
        """This adapter with token ``old`` trained at ``moved[old]``: exact, the rows do not change.

        Row ``i`` is token ``token_indices[i]``'s, so only the ids change; the
        rows hold no other token's, so a larger vocabulary needs nothing. A
        target whose rows are not token ids (not in ``vocabulary``) keeps its
        ids, and one of them among ``moved`` is refused.
        """
        targets = [key[: -len(ROWS) - 1] for key in tensors if key.endswith("." + ROWS)]
        for target in targets:
            ids = self.indices_for(target) or []
            if target not in vocabulary and set(ids) & set(moved):
                raise ConfigError(
                    f"it trains rows {sorted(set(ids) & set(moved))} of {target}, whose rows are not the "
                    "tokenizer's ids (it is not the input embedding, the output head or tied to them), so "
                    "moving those tokens would not move these rows"
                )

        def moved_ids(ids: list[int]) -> list[int]:
            return [moved.get(i, i) for i in ids]

        if isinstance(self.token_indices, dict):
            indices: TokenIndices = {
                key: ids if not any(self._names(key, t) for t in vocabulary) else moved_ids(ids)
                for key, ids in self.token_indices.items()
            }
        else:
            indices = moved_ids(self.token_indices)
        return dataclasses.replace(self, token_indices=indices), dict(tensors)

    @staticmethod
    def _names(key: str, target_name: str) -> bool:
        """Whether a ``token_indices`` key names ``target_name`` (as :meth:`indices_for` matches)."""
        return target_name == key or target_name.endswith("." + key)


def add_new_tokens(
    model: Any,
    tokenizer: Any,
    tokens: Iterable[Any] | Mapping[Any, str | None],
    *,
    special_tokens: bool = False,
    **config_kwargs: Any,
) -> TrainableTokensConfig:
    """Add ``tokens`` to ``tokenizer`` and ``model``; return the config that trains their rows.

    ``tokens`` is a list of new tokens (strings, or ``tokenizers.AddedToken``
    for control over stripping), or a ``{token: description}`` dict. Each new
    row of the input embedding (and of an untied LM head, and its bias) starts
    as the mean of the rows of the word-pieces the tokenizer split the token
    into *before* it was added, or of the pieces of its description (``None``
    as a description means the token's own text). The mean is of the stored
    rows, so a model that scales its embedding output (Gemma) stays consistent.

    The embeddings are resized to ``len(tokenizer)`` when they are too small
    (never shrunk: a model with spare rows, as T5's, keeps them), and a tied
    LM head stays tied. ``special_tokens`` is passed to ``tokenizer.add_tokens``;
    ``config_kwargs`` go to :class:`TrainableTokensConfig` (``init_weights``,
    ``target_modules``).

    A token the tokenizer already has (in its vocabulary, or encoding to one
    token) is an error naming it: this adds new tokens only, and never
    re-initialises a trained row. To train existing tokens' rows use
    ``TrainableTokensConfig.from_tokens(tokens, tokenizer)``. Every check runs
    before anything changes, and the tokens are first added to a copy of the
    tokenizer, so a refused call leaves ``model`` and ``tokenizer`` as they were.
    """
    return add_tokens_for(TrainableTokensConfig, model, tokenizer, tokens, special_tokens, config_kwargs)
