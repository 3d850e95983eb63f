"""From token strings to a TrainableTokensConfig: look up existing tokens, or add new ones.

:func:`token_ids` turns strings that are already single tokens into their ids.
:func:`add_tokens_for` does in one call what adding tokens takes by hand: add
them to the tokenizer, resize the model's embeddings (keeping a tied head
tied), start each new row from the mean of the rows of the word-pieces the
token used to be split into (or of a description given for it), and return
the config that trains those rows.

The config module calls them: ``TrainableTokensConfig.from_tokens`` and
``TrainableTokensConfig.add_new_tokens`` (how code that reaches the config
class through the plugin manager calls them), and ``add_new_tokens``.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any, TypeVar

import torch
from torch import nn

from tt_core import AdapterLayer
from tt_core.api.errors import AdapterStateError, ArgumentTypeError, ConfigError

if TYPE_CHECKING:
    from tt_plugins.trainable_tokens.config import TrainableTokensConfig

Tokens = Iterable[Any] | Mapping[Any, str | None]
_Config = TypeVar("_Config", bound="TrainableTokensConfig")


def _content(token: Any) -> str:
    """The text of a token given as a string or a ``tokenizers.AddedToken``."""
    content = token if isinstance(token, str) else getattr(token, "content", None)
    if not isinstance(content, str):
        raise ArgumentTypeError(f"a token must be a string (or a tokenizers.AddedToken), got {token!r}")
    if not content.strip():
        raise ConfigError(f"token {token!r} is empty or only whitespace; give each token some text")
    return content


def _as_list(tokens: Any, argument: str) -> list[Any]:
    if isinstance(tokens, (str, bytes)) or _is_added_token(tokens):
        raise ArgumentTypeError(
            f"{argument} must be a list of tokens, got the single token {tokens!r}; wrap it in a list"
        )
    if not isinstance(tokens, Iterable):
        raise ArgumentTypeError(f"{argument} must be a list of tokens, got {tokens!r}")
    found = list(tokens)
    if not found:
        raise ConfigError(f"{argument} is empty; give at least one token")
    return found


def _is_added_token(value: Any) -> bool:
    return not isinstance(value, str) and isinstance(getattr(value, "content", None), str)


def _no_repeats(contents: list[str], argument: str) -> None:
    repeated = sorted({content for content in contents if contents.count(content) > 1})
    if repeated:
        raise ConfigError(f"{argument} names {repeated} more than once; give each token once")


def _encode(tokenizer: Any, text: str) -> list[int]:
    """The ids ``tokenizer`` gives ``text`` on its own, without special tokens."""
    encoded = tokenizer(text, add_special_tokens=False)["input_ids"]
    return [int(i) for i in encoded]


def _unknown_id(tokenizer: Any) -> int | None:
    unknown = getattr(tokenizer, "unk_token_id", None)
    return unknown if isinstance(unknown, int) else None


def _one_known_token(tokenizer: Any, content: str, encoded: list[int]) -> bool:
    """Whether ``encoded`` (the ids of ``content``) is one token, and not the unknown token standing in."""
    unknown = _unknown_id(tokenizer)
    return len(encoded) == 1 and (encoded[0] != unknown or content == getattr(tokenizer, "unk_token", None))


def _pieces(tokenizer: Any, ids: list[int]) -> str:
    return " ".join(tokenizer.convert_ids_to_tokens(ids))


def _check_tokenizer(tokenizer: Any) -> None:
    needed = ("get_vocab", "add_tokens", "convert_ids_to_tokens", "__len__", "__call__")
    missing = [name for name in needed if not hasattr(tokenizer, name)]
    if missing:
        raise ArgumentTypeError(
            f"tokenizer must be a transformers tokenizer (e.g. AutoTokenizer.from_pretrained(...)); "
            f"{type(tokenizer).__name__} has no {', '.join(missing)}"
        )


def token_ids(tokenizer: Any, tokens: Iterable[Any]) -> list[int]:
    """The ids of ``tokens``, each a string that is already one token of ``tokenizer``.

    A string is found in the vocabulary as written (``"Ġhello"``, ``"<tool_call>"``),
    or else it must encode to exactly one token (``"Hello"`` in an uncased
    vocabulary). Strings that are not single tokens are an error naming them
    and how they split: add those with :func:`add_new_tokens`.
    """
    _check_tokenizer(tokenizer)
    wanted = _as_list(tokens, "tokens")
    contents = [_content(token) for token in wanted]
    _no_repeats(contents, "tokens")
    vocabulary = tokenizer.get_vocab()
    ids: list[int] = []
    split: list[str] = []
    for content in contents:
        if content in vocabulary:
            ids.append(int(vocabulary[content]))
            continue
        encoded = _encode(tokenizer, content)
        if _one_known_token(tokenizer, content, encoded):
            ids.append(encoded[0])
        else:
            split.append(f"{content!r} ({len(encoded)} tokens: {_pieces(tokenizer, encoded)})")
    if split:
        raise ConfigError(
            f"these are not single tokens of the tokenizer: {', '.join(split)}. Add them as new tokens with "
            "TrainableTokensConfig.add_new_tokens(model, tokenizer, [...]), which also resizes the model"
        )
    same = {i: [c for c, j in zip(contents, ids, strict=True) if j == i] for i in ids if ids.count(i) > 1}
    if same:
        described = "; ".join(f"{names} are all id {i}" for i, names in same.items())
        raise ConfigError(f"tokens name one token twice: {described}. Give each token once")
    return ids


def _input_embedding(model: nn.Module) -> nn.Module:
    get = getattr(model, "get_input_embeddings", None)
    if not callable(get):
        raise ArgumentTypeError(
            f"{type(model).__name__} has no get_input_embeddings(); pass a transformers model "
            "(or a module that defines get_input_embeddings())"
        )
    embedding = get()
    if isinstance(embedding, AdapterLayer):
        raise ConfigError(
            "the model already carries adapters, and a model carrying adapters cannot be resized; add the "
            "new tokens to the base model before get_adapter_model() (or unload() the adapters first)"
        )
    weight = getattr(embedding, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ArgumentTypeError(f"the model's input embedding {type(embedding).__name__} has no 2-d weight")
    if weight.device.type == "meta":
        raise ConfigError("the model's embedding is on the meta device; load its weights first")
    return embedding


def _weight(module: nn.Module) -> torch.Tensor:
    weight = module.weight
    if not isinstance(weight, torch.Tensor):
        raise ArgumentTypeError(
            f"{type(module).__name__}.weight is {type(weight).__name__}, not a tensor; the model's "
            "embeddings must hold a 2-d weight"
        )
    return weight


def _output_embedding(model: nn.Module) -> nn.Module | None:
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    return head if isinstance(getattr(head, "weight", None), torch.Tensor) else None


def _is_tied(model: nn.Module) -> bool:
    head = _output_embedding(model)
    return head is not None and _weight(head) is _weight(_input_embedding(model))


def _resize(model: nn.Module, size: int) -> None:
    resize: Any = model.resize_token_embeddings
    tied = _is_tied(model)
    # The new rows are overwritten below: skip transformers' costly mean/covariance initialisation.
    parameters = inspect.signature(resize).parameters
    kwargs = {"mean_resizing": False} if "mean_resizing" in parameters else {}
    resize(size, **kwargs)
    if tied and not _is_tied(model):
        tie: Any = getattr(model, "tie_weights", None)
        if callable(tie):
            tie()
        if not _is_tied(model):
            raise AdapterStateError(
                f"resizing {type(model).__name__} untied its LM head from the input embedding; tie them "
                "again (model.tie_weights()) before training"
            )


@torch.no_grad()
def _set_rows(weight: torch.Tensor, new_ids: list[int], sources: list[list[int]]) -> None:
    """Row ``new_ids[i]`` of ``weight`` := the mean of its rows ``sources[i]`` (as stored, in float32)."""
    for new_id, rows in zip(new_ids, sources, strict=True):
        weight[new_id] = weight[rows].float().mean(dim=0).to(weight.dtype)


def add_tokens_for(
    config_class: type[_Config],
    model: nn.Module,
    tokenizer: Any,
    tokens: Tokens,
    special_tokens: bool,
    config_kwargs: dict[str, Any],
) -> _Config:
    """:func:`~tt_plugins.trainable_tokens.config.add_new_tokens`, returning a ``config_class``.

    ``config_class`` is TrainableTokensConfig or a subclass: passed in, so this
    module never imports the config (the config imports it).
    """
    _check_tokenizer(tokenizer)
    if "token_indices" in config_kwargs:
        raise ArgumentTypeError(
            "add_new_tokens() chooses token_indices itself (the new tokens' ids); drop it"
        )
    if isinstance(tokens, Mapping):
        wanted = _as_list(list(tokens), "tokens")
        descriptions = [tokens[token] for token in wanted]
    else:
        wanted = _as_list(tokens, "tokens")
        descriptions = [None] * len(wanted)
    contents = [_content(token) for token in wanted]
    _no_repeats(contents, "tokens")
    for content, description in zip(contents, descriptions, strict=True):
        if description is not None and (not isinstance(description, str) or not description.strip()):
            raise ConfigError(
                f"the description of {content!r} is {description!r}; give a few words whose rows the new "
                "row starts from (or None to start from the token's own word-pieces)"
            )

    embedding = _input_embedding(model)
    rows = int(_weight(embedding).shape[0])
    vocabulary = tokenizer.get_vocab()
    existing: list[str] = []
    sources: list[list[int]] = []
    for content, description in zip(contents, descriptions, strict=True):
        own = _encode(tokenizer, content)
        if content in vocabulary or _one_known_token(tokenizer, content, own):
            existing.append(f"{content!r} (id {vocabulary.get(content, own[0])})")
            continue
        source = own if description is None else _encode(tokenizer, description)
        if not source or all(i == _unknown_id(tokenizer) for i in source):
            text = content if description is None else description
            what = "no tokens at all" if not source else "only the unknown token"
            raise ConfigError(
                f"{text!r} encodes to {what}, so the row of {content!r} has nothing to start from; "
                "give it a description the tokenizer knows: {token: 'a few words'}"
            )
        sources.append(source)
    if existing:
        raise ConfigError(
            f"the tokenizer already has {', '.join(existing)}; add_new_tokens adds new tokens only. Leave "
            "those out, or train their existing rows with "
            "TrainableTokensConfig.from_tokens(tokens, tokenizer)"
        )
    too_far = sorted({i for source in sources for i in source if i >= rows})
    if too_far:
        raise ConfigError(
            f"the tokenizer gives ids {too_far[:10]} but the model's embedding has only {rows} rows; the "
            f"model does not match this tokenizer (it has {len(tokenizer)} tokens). Resize the model with "
            "model.resize_token_embeddings(len(tokenizer)) first, or load the matching tokenizer"
        )
    start = len(tokenizer)
    new_ids = list(range(start, start + len(contents)))
    size = max(rows, new_ids[-1] + 1)
    if size > rows and not callable(getattr(model, "resize_token_embeddings", None)):
        raise ArgumentTypeError(
            f"{type(model).__name__} has no resize_token_embeddings() and its embedding has {rows} rows, "
            f"too few for {size} tokens; give its embedding {size} rows first"
        )
    config = config_class(token_indices=new_ids, **config_kwargs)  # checks the kwargs

    # A dry run on a copy: the tokenizer must give each token the expected id and keep it whole.
    try:
        trial = copy.deepcopy(tokenizer)
    except Exception:  # a tokenizer that cannot be copied is checked as the tokens are added
        trial = None
    if trial is not None:
        _add_to(trial, wanted, contents, new_ids, special_tokens)
    _add_to(tokenizer, wanted, contents, new_ids, special_tokens)
    if size > rows:
        _resize(model, size)
    weight = _weight(_input_embedding(model))
    _set_rows(weight, new_ids, sources)
    head = _output_embedding(model)
    if head is not None and _weight(head) is not weight and _weight(head).shape[0] == weight.shape[0]:
        _set_rows(_weight(head), new_ids, sources)  # an untied head: its own rows, averaged the same way
    bias = getattr(head, "bias", None)
    if isinstance(bias, torch.Tensor) and bias.dim() == 1 and bias.shape[0] == weight.shape[0]:
        with torch.no_grad():
            for new_id, source in zip(new_ids, sources, strict=True):
                bias[new_id] = bias[source].float().mean().to(bias.dtype)
    return config


def _add_to(
    tokenizer: Any, wanted: list[Any], contents: list[str], new_ids: list[int], special_tokens: bool
) -> None:
    added = tokenizer.add_tokens(list(wanted), special_tokens=special_tokens)
    got = [tokenizer.convert_tokens_to_ids(content) for content in contents]
    if added != len(wanted) or got != new_ids:
        raise ConfigError(
            f"the tokenizer added {added} of {len(wanted)} tokens, at ids {got} instead of {new_ids}; "
            "it may normalise some of them into each other or into existing tokens. Check the tokens "
            "with tokenizer.tokenize() and pick distinct ones"
        )
    whole = [c for c, i in zip(contents, new_ids, strict=True) if _encode(tokenizer, c).count(i) != 1]
    if whole:
        raise ConfigError(
            f"after adding, the tokenizer still does not encode {whole} as the new token; it may strip "
            "or normalise them. Check them with tokenizer.tokenize() and pick other strings"
        )
