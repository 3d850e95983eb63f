"""Adapters whose added tokens claim the same ids: the later ones' tokens move to fresh ids.

Independently trained token adapters usually add their tokens at the same ids
(after the same base vocabulary). ``Registry.load(..., relocate=True)`` loads
them into one model and one tokenizer (docs/combining.md, "Token collisions"):

- strings decide: a token whose string the tokenizer (or an earlier adapter)
  already has goes to that id, so the same string at the same id is shared;
- a token whose id is free keeps it;
- a token whose id another string holds gets a fresh id, after every id in
  use, in the order of the adapters and then of the ids.

:func:`plan` decides that from the recorded tokens alone; :func:`relocate_saved`
then asks each adapter's method (``AdapterConfig.relocate_tokens``) for its
config and tensors with the new ids and the new vocabulary size, and
:func:`check_fits` checks the result against the model as the load will
resize it. All of it runs before the tokenizer or the model changes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from torch import nn

from tt_core.api.errors import ConfigError, RegistryError
from tt_core.disk import storage
from tt_core.formats import native
from tt_core.tensors.targets import named_base_modules


@dataclasses.dataclass(frozen=True)
class MovedToken:
    """One token of one adapter given another id than the one it was published with."""

    content: str
    old_id: int
    new_id: int
    spec: str  # the adapter, as name@version

    def __str__(self) -> str:
        return f"token {self.content!r}: id {self.old_id} -> {self.new_id} ({self.spec})"


@dataclasses.dataclass(frozen=True)
class Relocation:
    """What a load with ``relocate=True`` does to the adapters' tokens.

    ``moved``: the tokens given another id. ``shared``: tokens several
    adapters record with the same string at the same id, added once.
    ``tokens``: every recorded token with the id it ends up at (what the
    tokenizer must hold). ``rows``: the model's embedding rows after the load.
    """

    moved: tuple[MovedToken, ...]
    shared: tuple[str, ...]
    tokens: tuple[dict[str, Any], ...]
    rows: int = 0

    def moves_for(self, spec: str) -> dict[int, int]:
        """``{old id: new id}`` for the tokens of adapter ``spec`` that move."""
        return {token.old_id: token.new_id for token in self.moved if token.spec == spec}

    def __str__(self) -> str:
        if not self.moved:
            return "relocate=True: no token moved"
        moves = "; ".join(str(token) for token in self.moved)
        return f"relocated {len(self.moved)} token(s) whose ids were taken: {moves}"


class RelocationWarning(UserWarning):
    """Warned by a load that moved tokens; ``relocation`` is the :class:`Relocation` it did."""

    def __init__(self, relocation: Relocation) -> None:
        super().__init__(str(relocation))
        self.relocation = relocation


def plan(
    vocabulary: Mapping[str, int], size: int, recorded: list[tuple[str, list[dict[str, Any]]]]
) -> Relocation:
    """Where each recorded token goes, for a tokenizer with ``vocabulary`` and ``size`` tokens.

    ``recorded``: each adapter's spec and its recorded added tokens, in load
    order. Earlier adapters keep their ids; see the module's docstring.
    """
    ids = {content: int(index) for content, index in vocabulary.items()}
    holder = {index: content for content, index in ids.items()}
    recorder: dict[str, str] = {}  # content -> the first spec recording it
    placed: dict[str, dict[str, Any]] = {}
    moved: list[MovedToken] = []
    shared: list[str] = []
    waiting: list[tuple[str, dict[str, Any]]] = []
    for spec, tokens in recorded:
        for token in sorted(tokens, key=lambda token: int(token["id"])):
            content, index = token["content"], int(token["id"])
            if content in ids:
                if ids[content] != index:
                    moved.append(MovedToken(content, index, ids[content], spec))
                elif recorder.get(content, spec) != spec and content not in {*vocabulary, *shared}:
                    shared.append(content)
            elif index not in holder:
                ids[content], holder[index] = index, content
            else:
                waiting.append((spec, token))
                continue
            recorder.setdefault(content, spec)
            placed.setdefault(content, {**token, "id": ids[content]})
    fresh = max([size, *(index + 1 for index in holder)])
    for spec, token in waiting:
        content, index = token["content"], int(token["id"])
        if content not in ids:  # else a later adapter placed the same string: it goes there
            ids[content], holder[fresh] = fresh, content
            placed[content] = {**token, "id": fresh}
            fresh += 1
        moved.append(MovedToken(content, index, ids[content], spec))
    order = {spec: number for number, (spec, _) in enumerate(recorded)}
    moved.sort(key=lambda token: (order[token.spec], token.old_id))
    return Relocation(tuple(moved), tuple(shared), tuple(placed.values()))


def vocabulary_modules(model: nn.Module) -> set[str]:
    """The modules whose rows are token ids: those holding the input or output embedding's weight."""
    weights = []
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        get = getattr(model, getter, None)
        module = get() if callable(get) else None
        module = getattr(module, "base_layer", module)  # an AdapterLayer wraps it
        weight = getattr(module, "weight", None)
        if weight is not None:
            weights.append(weight)
    found = set()
    for name, module in named_base_modules(model):
        weight = getattr(module, "weight", None)
        if weight is not None and any(weight is other for other in weights):
            found.add(name)
    return found


def relocate_saved(
    saved: storage.SavedAdapter, spec: str, moves: Mapping[int, int], rows: int, vocabulary: set[str]
) -> storage.SavedAdapter:
    """``saved`` with its tokens at ``moves``' ids and its vocabulary targets at ``rows`` rows.

    Unchanged when nothing moves and its targets have ``rows`` rows already;
    otherwise the method rewrites its config and tensors, or the load is
    refused with a :class:`RegistryError` naming ``spec`` and why.
    """
    tensors, shapes = native.read_tensors(saved)
    targets = {target: rows for target in shapes if target in vocabulary}
    bigger = {target: shapes[target][0] for target in targets if shapes[target][0] > rows}
    if bigger:
        raise RegistryError(
            f"{spec} was saved for {bigger} rows, more than the {rows} this load gives the model; load it "
            "onto a model with its vocabulary"
        )
    if not moves and all(shapes[target][0] == rows for target in targets):
        return saved
    config = native.read_config(saved)
    try:
        config, tensors = config.relocate_tokens(dict(moves), dict(tensors), targets)
    except ConfigError as error:
        moving = ", ".join(f"{old} -> {new}" for old, new in moves.items()) or "none"
        raise RegistryError(
            f"{spec} cannot be relocated (its token ids moving: {moving}; its vocabulary growing to {rows} "
            f"rows): {error}. Nothing was changed"
        ) from None
    new_shapes = {target: [targets.get(target, shape[0]), shape[1]] for target, shape in shapes.items()}
    return native.with_contents(saved, config, tensors, new_shapes)


def check_fits(
    saved: storage.SavedAdapter, spec: str, model: nn.Module, rows: int, vocabulary: set[str], strict: bool
) -> None:
    """Refuse, before anything changes, an adapter that will not fit ``model`` resized to ``rows`` rows.

    What the load itself checks after the resize (``native.read_adapter``):
    each target's shape and, with ``strict``, the base model's fingerprint.
    """
    _, shapes = native.read_tensors(saved)
    modules = dict(named_base_modules(model))
    for target, shape in shapes.items():
        weight = getattr(modules.get(target), "weight", None)
        if weight is None:
            raise RegistryError(f"{spec} adapts {target}, which this model does not have")
        expected = [rows if target in vocabulary else int(weight.shape[0]), int(weight.shape[1])]
        if list(shape) != expected:
            raise RegistryError(
                f"{spec} was saved for {target} of shape {tuple(shape)}, but after this load the model's is "
                f"{tuple(expected)}: it was trained on another model"
            )
    if strict and "base" in saved.entry:
        problems = native.base_mismatches(saved.entry["base"], model, saved.listed_in)
        if problems:
            raise RegistryError(
                f"{spec} was trained on another base model: {'; '.join(problems)}. Load it onto that base, "
                "or pass strict=False to load it anyway"
            )
