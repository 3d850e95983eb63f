"""Trainable tokens combine row by row: each type against a hand-written reference, on the model families."""

import pytest
import torch
from models import FAMILIES, WIDTH, adapter_state, batch, build, logits, reference_logits
from numerics import assert_same_math

from tt_core import AdapterModel, ConfigError
from tt_plugins.trainable_tokens import TrainableTokensConfig

FAMILY_NAMES = ["llama", "llama_tied", "opt", "gemma3"]
# Overlapping sets: rows 40, 41 are trained by both, the rest by one each.
FIRST, SECOND = [30, 40, 41, 90], [41, 40, 100]


def _model(family, seed=0):
    adapter_model = AdapterModel(build(family, seed))
    torch.manual_seed(seed + 7)
    adapter_model.add_adapter("first", TrainableTokensConfig(token_indices=FIRST, init_weights=False))
    adapter_model.add_adapter("second", TrainableTokensConfig(token_indices=SECOND, init_weights=False))
    return adapter_model


def _sources(adapter_model, family):
    """(ids, rows as lists of floats) of each source, and the base weight as lists."""
    found = []
    for name in ("first", "second"):
        state = adapter_state(adapter_model, family, name)
        found.append((state.token_indices.tolist(), state.trainable_tokens_rows.detach().double().tolist()))
    embedding = adapter_model.model.get_submodule(FAMILIES[family][1]).base_layer
    return found, embedding.weight.detach().double().tolist()


def _reference_rows(sources, base, weights, kind, density=1.0, sign_method="total", seed=None):
    """The combined rows over the sorted union of ids, by plain loops over rows and entries."""
    union = sorted({token for ids, _ in sources for token in ids})
    changes = []  # changes[source][row][entry]
    for ids, rows in sources:
        change = []
        for token in union:
            if token in ids:
                change.append([rows[ids.index(token)][c] - base[token][c] for c in range(WIDTH)])
            else:
                change.append([0.0] * WIDTH)
        changes.append(change)
    if kind in ("ties", "magnitude_prune"):
        keep = int(density * WIDTH)
        for change in changes:
            for row in change:
                largest = sorted(range(WIDTH), key=lambda c, row=row: -abs(row[c]))[:keep]
                for c in range(WIDTH):
                    if c not in largest:
                        row[c] = 0.0
    if kind.startswith("dare"):
        # The documented draws: one generator seeded with `seed`, one mask of (rows, width) per source.
        generator = torch.Generator().manual_seed(seed)
        for change in changes:
            mask = torch.bernoulli(torch.full((len(union), WIDTH), density), generator=generator).tolist()
            for r, row in enumerate(change):
                for c in range(WIDTH):
                    row[c] = row[c] * mask[r][c] / density
    result = []
    for r, token in enumerate(union):
        row = []
        for c in range(WIDTH):
            values = [change[r][c] for change in changes]
            if kind in ("ties", "dare_ties"):

                def sign(x):
                    return (x > 0) - (x < 0)

                votes = sum(values) if sign_method == "total" else sum(sign(v) for v in values)
                elected = 1 if votes >= 0 else -1
                agreeing = [i for i, v in enumerate(values) if sign(v) == elected]
                value = sum(weights[i] * values[i] for i in agreeing) / max(len(agreeing), 1)
            else:
                value = sum(w * v for w, v in zip(weights, values, strict=True))
            row.append(base[token][c] + value)
        result.append(row)
    return union, torch.tensor(result)


CASES = [
    ("linear", {}, {}),
    ("linear", {}, {"negative": True}),
    ("magnitude_prune", {"density": 0.5}, {}),
    ("ties", {"density": 0.5}, {}),
    ("ties", {"density": 0.75, "majority_sign_method": "frequency"}, {}),
    ("dare_linear", {"density": 0.6, "seed": 3}, {}),
    ("dare_ties", {"density": 0.6, "seed": 5, "majority_sign_method": "frequency"}, {}),
]


@pytest.mark.parametrize("family", FAMILY_NAMES)
@pytest.mark.parametrize("kind,options,flags", CASES, ids=[f"{c[0]}{'-neg' if c[2] else ''}" for c in CASES])
def test_each_type_matches_the_reference_rows(family, kind, options, flags):
    adapter_model = _model(family)
    weights = [0.7, -0.4] if flags.get("negative") else [0.7, 0.5]
    adapter_model.add_weighted_adapter(["first", "second"], weights, "mixed", kind, **options)
    sources, base = _sources(adapter_model, family)
    union, expected = _reference_rows(
        sources,
        base,
        weights,
        kind,
        options.get("density", 1.0),
        options.get("majority_sign_method", "total"),
        options.get("seed"),
    )
    state = adapter_state(adapter_model, family, "mixed")
    assert state.token_indices.tolist() == union
    assert adapter_model.adapter_configs["mixed"].token_indices == union
    assert_same_math(state.trainable_tokens_rows.detach(), expected.float())


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_the_combined_adapter_computes_the_base_model_with_its_rows(family):
    adapter_model = _model(family)
    adapter_model.add_weighted_adapter(["first", "second"], [0.3, 0.9], "mixed", "linear")
    sources, base = _sources(adapter_model, family)
    union, rows = _reference_rows(sources, base, [0.3, 0.9], "linear")
    adapter_model.set_adapter("mixed")
    inputs = batch(family, union)
    effective = torch.tensor(base, dtype=torch.float32)
    effective[union] = rows.float()
    expected = reference_logits(build(family), family, effective, inputs)
    with torch.no_grad():
        assert_same_math(logits(adapter_model, inputs), expected)


def test_rows_one_adapter_does_not_train_take_no_change_from_it():
    """Disjoint rows, weights 1 and 1: each row is its adapter's row, and the outputs the stack's."""
    adapter_model = AdapterModel(build("llama_tied"))
    torch.manual_seed(3)
    adapter_model.add_adapter("first", TrainableTokensConfig(token_indices=[10, 11], init_weights=False))
    adapter_model.add_adapter("second", TrainableTokensConfig(token_indices=[20], init_weights=False))
    adapter_model.add_weighted_adapter(["first", "second"], [1.0, 1.0], "both", "linear")
    mixed = adapter_state(adapter_model, "llama_tied", "both").trainable_tokens_rows.detach()
    first = adapter_state(adapter_model, "llama_tied", "first").trainable_tokens_rows.detach()
    second = adapter_state(adapter_model, "llama_tied", "second").trainable_tokens_rows.detach()
    assert_same_math(mixed, torch.cat([first, second]))
    inputs = batch("llama_tied", [10, 11, 20])
    with torch.no_grad():
        adapter_model.set_adapter(["first", "second"])
        stacked = logits(adapter_model, inputs)
        adapter_model.set_adapter("both")
        assert_same_math(logits(adapter_model, inputs), stacked)


def test_dare_is_reproducible_with_a_seed_and_differs_with_another():
    adapter_model = _model("llama")
    for name, seed in (("one", 11), ("again", 11), ("other", 12)):
        adapter_model.add_weighted_adapter(
            ["first", "second"], [1, 1], name, "dare_linear", density=0.5, seed=seed
        )
    rows = {
        name: adapter_state(adapter_model, "llama", name).trainable_tokens_rows
        for name in ("one", "again", "other")
    }
    assert torch.equal(rows["one"], rows["again"])
    assert not torch.equal(rows["one"], rows["other"])


def test_a_dare_without_a_seed_records_the_one_it_drew():
    adapter_model = _model("llama")
    adapter_model.add_weighted_adapter(["first", "second"], [1, 1], "drawn", "dare_ties", density=0.5)
    seed = adapter_model.adapter_record("drawn").combined_from["seed"]
    adapter_model.add_weighted_adapter(
        ["first", "second"], [1, 1], "remade", "dare_ties", density=0.5, seed=seed
    )
    states = [
        adapter_state(adapter_model, "llama", name).trainable_tokens_rows for name in ("drawn", "remade")
    ]
    assert torch.equal(*states)


@pytest.mark.parametrize("kind,options", [("svd", {}), ("cat", {}), ("ties_svd", {"density": 0.5})])
def test_types_trainable_tokens_do_not_support_are_refused_naming_those_it_does(kind, options):
    adapter_model = _model("llama")
    with pytest.raises(ConfigError, match=r"'trainable_tokens' cannot combine .*'linear', 'ties'"):
        adapter_model.add_weighted_adapter(["first", "second"], [1, 1], "mixed", kind, **options)
    assert adapter_model.adapters == ["first", "second"]


def test_adapters_on_several_embeddings_combine_per_weight():
    """A {module: ids} adapter: the union is taken per weight, and the config keys it by module."""
    adapter_model = AdapterModel(build("llama"))
    torch.manual_seed(4)
    adapter_model.add_adapter(
        "first",
        TrainableTokensConfig(
            token_indices={"model.embed_tokens": [5], "lm_head": [6, 7]}, init_weights=False
        ),
    )
    adapter_model.add_adapter(
        "second",
        TrainableTokensConfig(token_indices={"model.embed_tokens": [8], "lm_head": [7]}, init_weights=False),
    )
    adapter_model.add_weighted_adapter(["first", "second"], [0.5, 0.5], "mixed", "linear")
    assert adapter_model.adapter_configs["mixed"].token_indices == {
        "model.embed_tokens": [5, 8],
        "lm_head": [6, 7],
    }
    head = adapter_model.model.lm_head
    base = head.base_layer.weight.detach()
    first, second = (
        head.adapters["first"].trainable_tokens_rows,
        head.adapters["second"].trainable_tokens_rows,
    )
    expected = torch.stack(
        [
            base[6] + 0.5 * (first[0] - base[6]),
            base[7] + 0.5 * (first[1] - base[7]) + 0.5 * (second[0] - base[7]),
        ]
    )
    assert_same_math(head.adapters["mixed"].trainable_tokens_rows.detach(), expected.detach())
