"""LoRA on linear layers combines as LoRA on the embedding does (tt_plugins/lora_combining.py)."""

import pytest
import torch
from models import batch, build, logits
from numerics import assert_same_math

from tt_core import AdapterModel, ConfigError
from tt_plugins.lora_linear import LoraLinearConfig

TARGETS = ["q_proj", "v_proj"]


def _model(family="llama", **second):
    adapter_model = AdapterModel(build(family))
    torch.manual_seed(9)
    adapter_model.add_adapter(
        "first", LoraLinearConfig(r=2, lora_alpha=4, target_modules=TARGETS, init_lora_weights=False)
    )
    options = {"r": 3, "lora_alpha": 3, "target_modules": TARGETS, "init_lora_weights": False, **second}
    adapter_model.add_adapter("second", LoraLinearConfig(**options))
    return adapter_model


def _updates(adapter_model, name):
    """Each adapted module's update scaling * B @ A, summed by loops over the rank."""
    found = {}
    for module_name, module in adapter_model.model.named_modules():
        adapters = getattr(module, "adapters", {})
        if name not in adapters:
            continue
        state = adapters[name]
        a, b = state.lora_A.detach().double(), state.lora_B.detach().double()
        update = torch.zeros(b.shape[0], a.shape[1], dtype=torch.float64)
        for k in range(a.shape[0]):
            update += torch.outer(b[:, k], a[k])
        found[module_name] = state.scaling * update
    return found


def test_cat_equals_the_stack_and_the_weighted_sum():
    adapter_model = _model()
    adapter_model.add_weighted_adapter(["first", "second"], [1, 1], "mixed", "cat")
    assert adapter_model.adapter_configs["mixed"].r == 5
    first, second, mixed = (_updates(adapter_model, name) for name in ("first", "second", "mixed"))
    assert sorted(mixed) == sorted(first)
    for module_name, update in mixed.items():
        assert_same_math(update.float(), (first[module_name] + second[module_name]).float())
    inputs = batch("llama", [5, 6])
    with torch.no_grad():
        adapter_model.set_adapter(["first", "second"])
        stacked = logits(adapter_model, inputs)
        adapter_model.set_adapter("mixed")
        assert_same_math(logits(adapter_model, inputs), stacked)


def test_svd_at_the_rank_of_the_sum_is_exact_on_gpt2_conv1d():
    adapter_model = AdapterModel(build("gpt2"))
    torch.manual_seed(2)
    for name, r in (("first", 2), ("second", 1)):
        config = LoraLinearConfig(
            r=r, target_modules=["c_attn"], init_lora_weights=False, fan_in_fan_out=True
        )
        adapter_model.add_adapter(name, config)
    adapter_model.add_weighted_adapter(["first", "second"], [0.5, 2.0], "mixed", "svd", svd_rank=3)
    first, second, mixed = (_updates(adapter_model, name) for name in ("first", "second", "mixed"))
    for module_name, update in mixed.items():
        assert_same_math(update.float(), (0.5 * first[module_name] + 2.0 * second[module_name]).float())
    inputs = batch("gpt2", [5])
    with torch.no_grad():
        adapter_model.set_adapter("mixed")
        combined = logits(adapter_model, inputs)
        adapter_model.merge_adapter()  # the Conv1D's transposed weight takes the same update
        assert_same_math(logits(adapter_model, inputs), combined)


def test_adapters_with_trainable_token_indices_or_other_dropouts_are_refused():
    adapter_model = _model(lora_dropout=0.1)
    with pytest.raises(ConfigError, match=r"different lora_dropout \[0.0, 0.1\]"):
        adapter_model.add_weighted_adapter(["first", "second"], [1, 1], "mixed", "cat")
    adapter_model = AdapterModel(build("llama"))
    for name in ("first", "second"):
        config = LoraLinearConfig(target_modules=TARGETS, trainable_token_indices=[5])
        adapter_model.add_adapter(name, config)
    with pytest.raises(ConfigError, match="'first' also trains token rows"):
        adapter_model.add_weighted_adapter(["first", "second"], [1, 1], "mixed", "cat")
    assert adapter_model.adapters == ["first", "second"]
