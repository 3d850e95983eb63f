"""LoRA on the embedding combines with cat, linear and svd: each against its definition, on the families."""

import numpy as np
import pytest
import torch
from models import FAMILIES, VOCAB, WIDTH, adapter_state, batch, build, logits, reference_logits
from numerics import assert_same_math

from tt_core import AdapterModel, ConfigError
from tt_plugins.lora_embedding import LoraEmbeddingConfig

FAMILY_NAMES = ["llama", "llama_tied", "gpt2", "gemma3"]
TOKENS = [3, 17, 64, 127]


def _float32(array):
    """A float64 reference as float32, the adapters' dtype: compared at float32's rounding."""
    return torch.from_numpy(array).float()


def _model(family, ranks=(2, 3), alphas=(4, 3), seed=0):
    adapter_model = AdapterModel(build(family, seed))
    torch.manual_seed(seed + 5)
    for name, r, alpha in zip(("first", "second"), ranks, alphas, strict=True):
        adapter_model.add_adapter(name, LoraEmbeddingConfig(r=r, lora_alpha=alpha, init_weights=False))
    return adapter_model


def _factors(adapter_model, family, name):
    """A (r, vocabulary), B (width, r) and the scaling lora_alpha / r, as float64 numpy arrays."""
    state = adapter_state(adapter_model, family, name)
    config = adapter_model.adapter_configs[name]
    a = state.lora_embedding_A.detach().double().numpy()
    b = state.lora_embedding_B.detach().double().numpy()
    return a, b, config.lora_alpha / config.r


def _update(a, b, scaling):
    """scaling * (B @ A).T, the change of the (vocabulary, width) weight, entry by entry."""
    rank = a.shape[0]
    update = np.zeros((VOCAB, WIDTH))
    for v in range(VOCAB):
        for w in range(WIDTH):
            update[v, w] = scaling * sum(b[w, k] * a[k, v] for k in range(rank))
    return update


def _weighted_update(adapter_model, family, weights):
    total = np.zeros((VOCAB, WIDTH))
    for name, weight in zip(("first", "second"), weights, strict=True):
        total += weight * _update(*_factors(adapter_model, family, name))
    return total


def _combined_update(adapter_model, family, name="mixed"):
    return _float32(_update(*_factors(adapter_model, family, name)))


def _check_outputs(adapter_model, family, update):
    """The combined adapter alone computes the base model with W + update."""
    base = adapter_model.model.get_submodule(FAMILIES[family][1]).base_layer.weight.detach()
    adapter_model.set_adapter("mixed")
    inputs = batch(family, TOKENS)
    expected = reference_logits(build(family), family, base + update, inputs)
    with torch.no_grad():
        assert_same_math(logits(adapter_model, inputs), expected)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_cat_is_the_exact_weighted_sum_with_the_summed_rank(family):
    adapter_model = _model(family)
    adapter_model.add_weighted_adapter(["first", "second"], [0.6, -1.5], "mixed", "cat")
    config = adapter_model.adapter_configs["mixed"]
    assert (config.r, config.lora_alpha, config.scaling) == (5, 5, 1.0)
    expected = _float32(_weighted_update(adapter_model, family, [0.6, -1.5]))
    assert_same_math(_combined_update(adapter_model, family), expected)
    _check_outputs(adapter_model, family, expected)


@pytest.mark.parametrize("family", ["llama_tied", "gemma3"])
def test_cat_with_weights_one_computes_what_the_stack_computes(family):
    adapter_model = _model(family)
    adapter_model.add_weighted_adapter(["first", "second"], [1, 1], "mixed", "cat")
    inputs = batch(family, TOKENS)
    with torch.no_grad():
        adapter_model.set_adapter(["first", "second"])
        stacked = logits(adapter_model, inputs)
        adapter_model.set_adapter("mixed")
        assert_same_math(logits(adapter_model, inputs), stacked)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_linear_splits_each_weight_between_the_factors_by_its_square_root(family):
    adapter_model = _model(family, ranks=(3, 3), alphas=(6, 3))
    weights = [0.5, -2.0]
    adapter_model.add_weighted_adapter(["first", "second"], weights, "mixed", "linear")
    assert adapter_model.adapter_configs["mixed"].r == 3
    # PEFT's definition: A = sum sign(w s) sqrt|w s| A_i, B = sum sqrt|w s| B_i, scaling 1.
    a_total, b_total = np.zeros((3, VOCAB)), np.zeros((WIDTH, 3))
    for name, weight in zip(("first", "second"), weights, strict=True):
        a, b, scaling = _factors(adapter_model, family, name)
        factor = weight * scaling
        a_total += np.sign(factor) * np.sqrt(abs(factor)) * a
        b_total += np.sqrt(abs(factor)) * b
    a_mixed, b_mixed, scaling_mixed = _factors(adapter_model, family, "mixed")
    assert scaling_mixed == 1.0
    assert_same_math(_float32(a_mixed), _float32(a_total))
    assert_same_math(_float32(b_mixed), _float32(b_total))
    _check_outputs(adapter_model, family, _float32(_update(a_total, b_total, 1.0)))


def test_linear_refuses_adapters_of_different_ranks_naming_them():
    adapter_model = _model("llama")
    with pytest.raises(ConfigError, match=r"same rank \('first': r=2, 'second': r=3\).*'cat'"):
        adapter_model.add_weighted_adapter(["first", "second"], [1, 1], "mixed", "linear")
    assert adapter_model.adapters == ["first", "second"]


@pytest.mark.parametrize("family", FAMILY_NAMES)
@pytest.mark.parametrize("svd_rank", [None, 4])
def test_svd_is_the_best_approximation_of_the_weighted_sum_at_the_stated_rank(family, svd_rank):
    adapter_model = _model(family)
    adapter_model.add_weighted_adapter(["first", "second"], [0.8, 0.4], "mixed", "svd", svd_rank=svd_rank)
    rank = svd_rank or 3  # the default: the largest source rank
    config = adapter_model.adapter_configs["mixed"]
    assert (config.r, config.lora_alpha) == (rank, rank)
    total = _weighted_update(adapter_model, family, [0.8, 0.4])
    u, singular, vh = np.linalg.svd(total, full_matrices=False)
    best = (u[:, :rank] * singular[:rank]) @ vh[:rank]
    # An SVD's entries are sums along the vocabulary: VOCAB terms long.
    assert_same_math(_combined_update(adapter_model, family), _float32(best), terms=VOCAB)
    _check_outputs(adapter_model, family, _float32(best))


def test_svd_at_the_full_rank_of_the_sum_is_exact():
    adapter_model = _model("llama_tied")
    adapter_model.add_weighted_adapter(["first", "second"], [0.8, 0.4], "mixed", "svd", svd_rank=5)
    expected = _float32(_weighted_update(adapter_model, "llama_tied", [0.8, 0.4]))
    assert_same_math(_combined_update(adapter_model, "llama_tied"), expected)


def test_ties_svd_trims_each_update_as_a_whole_before_the_svd():
    adapter_model = _model("llama")
    adapter_model.add_weighted_adapter(
        ["first", "second"], [1.0, 0.5], "mixed", "ties_svd", svd_rank=WIDTH, density=0.3
    )
    updates = [_update(*_factors(adapter_model, "llama", name)) for name in ("first", "second")]
    keep = int(0.3 * VOCAB * WIDTH)
    trimmed = []
    for update in updates:
        flat = update.reshape(-1).copy()
        flat[np.argsort(-np.abs(flat))[keep:]] = 0.0
        trimmed.append(flat.reshape(update.shape))
    stacked = np.stack(trimmed)
    elected = np.where(stacked.sum(0) >= 0, 1.0, -1.0)
    agree = np.sign(stacked) == elected
    weighted = stacked * np.array([1.0, 0.5])[:, None, None]
    expected = (weighted * agree).sum(0) / np.maximum(agree.sum(0), 1)
    assert_same_math(_combined_update(adapter_model, "llama"), _float32(expected))


def test_an_svd_rank_above_what_the_update_can_have_is_refused():
    adapter_model = _model("llama")
    with pytest.raises(ConfigError, match=rf"svd_rank=17 is more than .*\({WIDTH}"):
        adapter_model.add_weighted_adapter(["first", "second"], [1, 1], "mixed", "svd", svd_rank=17)
    assert adapter_model.adapters == ["first", "second"]


@pytest.mark.parametrize("save_format", ["tt", "peft"])
def test_the_combination_saves_and_loads_back_in_both_formats(tmp_path, save_format):
    adapter_model = _model("llama_tied")
    adapter_model.add_weighted_adapter(["first", "second"], [0.5, 1.0], "mixed", "svd", svd_rank=4)
    adapter_model.set_adapter("mixed")
    inputs = batch("llama_tied", TOKENS)
    with torch.no_grad():
        expected = logits(adapter_model, inputs)
    adapter_model.save_pretrained(tmp_path, selected_adapters=["mixed"], format=save_format)
    loaded = AdapterModel.from_pretrained(build("llama_tied"), tmp_path)
    assert loaded.adapter_configs[loaded.active_adapter].r == 4
    with torch.no_grad():
        assert_same_math(logits(loaded, inputs), expected)


@pytest.mark.parametrize(
    "kind,options",
    [
        ("cat", {}),
        ("linear", {}),
        ("svd", {"svd_rank": 4}),
        ("ties_svd", {"density": 0.4}),
        ("magnitude_prune_svd", {"density": 0.4}),
    ],
)
def test_peft_computes_the_same_update_from_the_same_adapters(tmp_path, kind, options):
    """The other reference: PEFT's own add_weighted_adapter on the same two adapters, saved in its format."""
    peft = pytest.importorskip("peft")
    ranks = (3, 3) if kind == "linear" else (2, 3)
    adapter_model = _model("llama", ranks=ranks, alphas=(4, 3))
    adapter_model.add_weighted_adapter(["first", "second"], [0.7, 0.4], "mixed", kind, **options)
    adapter_model.save_pretrained(tmp_path, selected_adapters=["first", "second"], format="peft")
    peft_model = peft.PeftModel.from_pretrained(build("llama"), str(tmp_path / "first"), adapter_name="first")
    peft_model.load_adapter(str(tmp_path / "second"), adapter_name="second")
    peft_model.add_weighted_adapter(["first", "second"], [0.7, 0.4], "mixed", kind, **options)
    peft_update = peft_model.base_model.model.model.embed_tokens.get_delta_weight("mixed")
    assert_same_math(_combined_update(adapter_model, "llama"), peft_update.detach().float(), terms=VOCAB)
