"""LoRA on linear layers computes what PEFT's LoRA does; it stacks, switches, merges, serves per sample."""

from __future__ import annotations

import copy
from typing import Any

import peft
import pytest
import torch
from models import batch, build, logits
from numerics import assert_same_math
from torch import nn

from tt_core import AdapterLayer, AdapterModel, get_adapter_model
from tt_core.serving import BASE
from tt_plugins.lora_embedding import LoraEmbeddingConfig
from tt_plugins.lora_linear import LoraLinearConfig, LoraLinearLayer
from tt_plugins.trainable_tokens import TrainableTokensConfig

pytestmark = pytest.mark.filterwarnings("ignore:fan_in_fan_out")

IDS = [5, 7, 100]
# PEFT's three ways to name targets, per family: names (suffix match), a regular expression, all-linear.
TARGETS: dict[str, dict[str, Any]] = {
    "llama": {"names": ["q_proj", "v_proj"], "regex": r".*\.mlp\.(up|down)_proj", "all": "all-linear"},
    "llama_tied": {"names": ["o_proj", "lm_head"], "regex": r".*self_attn\.[qk]_proj", "all": "all-linear"},
    "gpt2": {"names": ["c_attn"], "regex": r".*\.mlp\.c_(fc|proj)", "all": "all-linear"},
}


def wrapped(adapter_model: AdapterModel) -> list[str]:
    return sorted(n for n, m in adapter_model.model.named_modules() if isinstance(m, AdapterLayer))


def peft_lora_modules(model: nn.Module) -> dict[str, nn.Module]:
    prefix = "base_model.model."
    return {n[len(prefix) :]: m for n, m in model.named_modules() if hasattr(m, "lora_A") and m.lora_A}


def ours_like_peft(family: str, peft_options: dict[str, Any], **extra: Any) -> tuple[AdapterModel, nn.Module]:
    """PEFT's LoRA and ours with the same options; ours gets PEFT's (random) factors."""
    peft_model = peft.get_peft_model(build(family), peft.LoraConfig(**peft_options)).eval()
    adapter_model = get_adapter_model(build(family), LoraLinearConfig(**peft_options, **extra)).eval()
    peft_modules = peft_lora_modules(peft_model)
    assert wrapped(adapter_model) == sorted(peft_modules)  # the same modules targeted
    with torch.no_grad():
        for name, module in peft_modules.items():
            state = adapter_model.model.get_submodule(name).adapters["default"]
            state.lora_A.copy_(module.lora_A["default"].weight)
            state.lora_B.copy_(module.lora_B["default"].weight)
    return adapter_model, peft_model


# ------------------------------------------------------------------ PEFT's math
@pytest.mark.parametrize("family", list(TARGETS))
@pytest.mark.parametrize("form", ["names", "regex", "all"])
@pytest.mark.parametrize("rslora", [False, True])
def test_outputs_equal_peft(family, form, rslora):
    options = dict(
        r=4, lora_alpha=6, target_modules=TARGETS[family][form], use_rslora=rslora, init_lora_weights=False
    )
    adapter_model, peft_model = ours_like_peft(family, options)
    inputs = batch(family, IDS)
    expected = logits(peft_model, inputs)
    assert not torch.allclose(expected, logits(build(family), inputs))
    assert_same_math(logits(adapter_model, inputs), expected)
    with torch.no_grad():  # the folded path, without a gradient
        assert_same_math(logits(adapter_model, inputs), expected)


def test_all_linear_leaves_the_output_head_out_and_suffix_names_match_whole_parts():
    adapter_model = get_adapter_model(build("llama"), LoraLinearConfig(target_modules="ALL-LINEAR"))
    assert "lm_head" not in wrapped(adapter_model) and len(wrapped(adapter_model)) == 7
    assert adapter_model.adapter_configs["default"].target_modules == "all-linear"
    # "proj" ends no module name after a dot: it matches nothing, as in PEFT
    with pytest.raises(ValueError, match="'proj' does not exist"):
        get_adapter_model(build("llama"), LoraLinearConfig(target_modules=["proj"]))


def test_dropout_acts_in_training_only_and_draws_as_peft_does():
    options = dict(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.5, init_lora_weights=False)
    adapter_model, peft_model = ours_like_peft("llama", options)
    inputs = batch("llama", IDS)
    assert_same_math(logits(adapter_model, inputs), logits(peft_model, inputs))  # eval: no dropout
    adapter_model.train(), peft_model.train()
    torch.manual_seed(11)
    expected = logits(peft_model, inputs)
    torch.manual_seed(11)
    actual = logits(adapter_model, inputs)
    assert_same_math(actual, expected)  # the same mask: dropout on the same input, in the same order
    torch.manual_seed(12)
    assert not torch.allclose(logits(adapter_model, inputs), actual)


@pytest.mark.parametrize("init", [True, "gaussian", False])
def test_initialisations_are_peft_s(init):
    torch.manual_seed(0)
    adapter_model = get_adapter_model(
        build("llama"), LoraLinearConfig(r=2, target_modules=["q_proj"], init_lora_weights=init)
    )
    state = adapter_model.model.get_submodule("model.layers.0.self_attn.q_proj").adapters["default"]
    assert (
        isinstance(state, LoraLinearLayer) and state.lora_A.shape == (2, 16) and state.lora_B.shape == (16, 2)
    )
    bound = 1 / 16**0.5  # kaiming_uniform(a=sqrt(5)) of an nn.Linear(16, 2), as PEFT starts A
    if init is False:
        assert state.lora_B.abs().max() > 0 and state.lora_B.abs().max() <= 1 / 2**0.5
        assert not torch.allclose(
            logits(adapter_model, batch("llama", IDS)), logits(build("llama"), batch("llama", IDS))
        )
    else:
        assert not state.lora_B.any()  # B starts at zero: a no-op
        assert torch.equal(
            logits(adapter_model, batch("llama", IDS)), logits(build("llama"), batch("llama", IDS))
        )
    if init == "gaussian":
        assert state.lora_A.abs().max() > bound  # normal with std 1/r = 0.5, not the uniform bound
    else:
        assert state.lora_A.abs().max() <= bound


# ------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "options, match",
    [
        (dict(target_modules=None), "needs target_modules"),
        (dict(target_modules=["q_proj"], bias="all"), "bias='all'"),
        (dict(target_modules=["q_proj"], bias="lora_only"), "bias='lora_only'"),
        (dict(target_modules=["q_proj"], init_lora_weights="pissa"), "init_lora_weights='pissa'"),
        (dict(target_modules=["q_proj"], lora_dropout=1.0), "lora_dropout=1.0"),
        (dict(target_modules=["q_proj"], r=0), "r=0"),
        (dict(target_modules=["q_proj"], use_rslora="yes"), "use_rslora"),
        (dict(target_modules=[]), "target_modules is empty"),
    ],
)
def test_bad_configs_are_refused_naming_the_option(options, match):
    with pytest.raises(ValueError, match=match):
        LoraLinearConfig(**options)


@pytest.mark.parametrize(
    "target, match",
    [
        (["embed_tokens"], r"model\.embed_tokens \(Embedding\).*LoraEmbeddingConfig"),
        (["self_attn"], r"self_attn \(LlamaAttention\).*not linear layers"),
        (["no_such_layer"], "'no_such_layer' does not exist"),
    ],
)
def test_targets_that_are_not_linear_layers_are_refused_and_the_model_is_unchanged(target, match):
    adapter_model = get_adapter_model(build("llama"), TrainableTokensConfig(token_indices=IDS))
    before = copy.deepcopy(adapter_model.model.state_dict())
    with pytest.raises(ValueError, match=match):
        adapter_model.add_adapter("bad", LoraLinearConfig(target_modules=target))
    assert adapter_model.adapters == ["default"] and wrapped(adapter_model) == ["model.embed_tokens"]
    after = adapter_model.model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize(
    "config",
    [
        TrainableTokensConfig(token_indices=[5, 7], target_modules=["c_attn"]),
        LoraEmbeddingConfig(target_modules=["c_attn"]),
    ],
    ids=["trainable_tokens", "lora_embedding"],
)
def test_methods_that_do_not_declare_conv1d_are_refused_on_it(config):
    adapter_model = get_adapter_model(build("gpt2"), LoraLinearConfig(target_modules=["c_fc"]))
    with pytest.raises(ValueError, match=r"c_attn is a transformers Conv1D.*does not adapt"):
        adapter_model.add_adapter("bad", config)
    assert adapter_model.adapters == ["default"] and wrapped(adapter_model) == ["transformer.h.0.mlp.c_fc"]


# ------------------------------------------------- stacks, switches, merges
def stacked_model(family: str) -> AdapterModel:
    """Tokens on the embedding, LoRA on all linear layers, LoRA on the first attention projection."""
    first = {"llama": ["q_proj"], "llama_tied": ["q_proj"], "gpt2": ["c_attn"]}[family]
    adapter_model = get_adapter_model(
        build(family), TrainableTokensConfig(token_indices=IDS, init_weights=False), adapter_name="tokens"
    )
    adapter_model.add_adapter(
        "wide", LoraLinearConfig(r=4, target_modules="all-linear", init_lora_weights=False)
    )
    adapter_model.add_adapter(
        "narrow", LoraLinearConfig(r=2, lora_alpha=4, target_modules=first, init_lora_weights=False)
    )
    return adapter_model.eval()


def folded_by_hand(adapter_model: AdapterModel, family: str, stack: list[str]) -> nn.Module:
    """The base model with every LoRA of ``stack`` added into its weights by hand (tokens left out)."""
    model = build(family)
    with torch.no_grad():
        for name, module in adapter_model.model.named_modules():
            if not isinstance(module, AdapterLayer):
                continue
            for adapter in stack:
                state = module.adapters[adapter] if adapter in module.adapters else None  # noqa: SIM401
                if isinstance(state, LoraLinearLayer):
                    delta = state.scaling * state.lora_B @ state.lora_A
                    weight = model.get_submodule(name).weight
                    weight.add_(delta.T if state.fan_in_fan_out else delta)
    return model.eval()


@pytest.mark.parametrize("family", list(TARGETS))
def test_stacks_switch_merge_selectively_and_unmerge(family):
    adapter_model = stacked_model(family)
    inputs = batch(family, [9, 11])  # no token of the tokens adapter: its rows play no part here
    for stack in (["wide"], ["narrow"], ["wide", "narrow"], ["narrow", "wide"]):
        adapter_model.set_adapter(stack)
        assert_same_math(
            logits(adapter_model, inputs), logits(folded_by_hand(adapter_model, family, stack), inputs)
        )
    adapter_model.set_adapter(["tokens", "wide", "narrow"])
    inputs = batch(family, IDS)
    stacked = logits(adapter_model, inputs)
    base = {k: v.clone() for k, v in adapter_model.model.state_dict().items() if ".adapters." not in k}
    adapter_model.merge_adapter(["tokens", "wide"])  # a prefix of the stack
    assert adapter_model.merged_adapters == ["tokens", "wide"]
    torch.testing.assert_close(logits(adapter_model, inputs), stacked)
    q = {"llama": "model.layers.0.self_attn.q_proj", "llama_tied": "model.layers.0.self_attn.q_proj"}.get(
        family, "transformer.h.0.attn.c_attn"
    )
    merged = adapter_model.model.get_submodule(q).base_layer.weight
    state = adapter_model.model.get_submodule(q).adapters["wide"]
    delta = state.scaling * state.lora_B @ state.lora_A
    torch.testing.assert_close(
        merged, base[f"{q}.base_layer.weight"] + (delta.T if state.fan_in_fan_out else delta)
    )
    adapter_model.merge_adapter(["narrow"])
    torch.testing.assert_close(logits(adapter_model, inputs), stacked)
    adapter_model.unmerge_adapter()
    now = adapter_model.model.state_dict()
    for key, value in base.items():
        torch.testing.assert_close(now[key], value)
    torch.testing.assert_close(logits(adapter_model, inputs), stacked)
    plain = adapter_model.merge_and_unload()
    assert not any(isinstance(m, AdapterLayer) for m in plain.modules())
    torch.testing.assert_close(logits(plain, inputs), stacked)


def test_a_tied_head_is_adapted_alone_as_in_peft_and_merging_into_the_shared_weight_is_refused():
    options = dict(r=4, lora_alpha=8, target_modules=["lm_head"], init_lora_weights=False)
    adapter_model, peft_model = ours_like_peft("llama_tied", options)
    assert wrapped(adapter_model) == ["lm_head"]  # the embedding sharing the weight stays as it is
    adapter_model.add_adapter("tokens", TrainableTokensConfig(token_indices=IDS, init_weights=False))
    inputs = batch("llama_tied", IDS)
    assert_same_math(logits(adapter_model, inputs), logits(peft_model, inputs))
    # stacked with tokens on the tied weight: the head gets the new rows plus the LoRA update of them
    adapter_model.set_adapter(["tokens", "default"])
    with torch.no_grad():
        reference = build("llama_tied")
        tokens = adapter_model.model.lm_head.adapters["tokens"]
        reference.lm_head.weight = nn.Parameter(reference.lm_head.weight.clone())  # untie, by hand
        reference.model.embed_tokens.weight[tokens.token_indices] = tokens.trainable_tokens_rows
        reference.lm_head.weight[tokens.token_indices] = tokens.trainable_tokens_rows
        state = adapter_model.model.lm_head.adapters["default"]
        reference.lm_head.weight += state.scaling * state.lora_B @ state.lora_A
    for grad in (False, True):
        with torch.set_grad_enabled(grad):
            assert_same_math(logits(adapter_model, inputs).detach(), logits(reference.eval(), inputs))
    weight = adapter_model.model.lm_head.base_layer.weight.clone()
    with pytest.raises(ValueError, match=r"model\.embed_tokens"):
        adapter_model.merge_adapter(["default"])
    assert adapter_model.merged_adapters == [] and torch.equal(
        adapter_model.model.lm_head.base_layer.weight, weight
    )


def test_save_and_load_keeps_the_stack_and_the_outputs(tmp_path):
    adapter_model = stacked_model("gpt2")
    adapter_model.set_adapter(["tokens", "narrow", "wide"])
    expected = logits(adapter_model, batch("gpt2", IDS))
    adapter_model.save_pretrained(tmp_path)
    loaded = AdapterModel.from_pretrained(build("gpt2"), tmp_path)
    assert loaded.active_adapters == ["tokens", "narrow", "wide"]
    assert loaded.adapter_configs["wide"] == adapter_model.adapter_configs["wide"]
    assert_same_math(logits(loaded, batch("gpt2", IDS)), expected)


# --------------------------------------------------------------- per sample
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_adapter_names_run_each_sample_with_its_own_stack(family):
    adapter_model = stacked_model(family)
    generator = torch.Generator().manual_seed(3)
    input_ids = torch.randint(2, 128, (4, 6), generator=generator)
    input_ids[0, 1], input_ids[3, 2] = IDS[0], IDS[2]
    entries = ["wide", ["tokens", "narrow", "wide"], BASE, "narrow"]
    with torch.no_grad():
        together = adapter_model(input_ids=input_ids, adapter_names=entries).logits
        for row, entry in enumerate(entries):
            with adapter_model.disable_adapter() if entry == BASE else _stack(adapter_model, entry):
                alone = adapter_model(input_ids=input_ids[row : row + 1]).logits
            assert_same_math(together[row : row + 1], alone)
        generated = adapter_model.generate(
            input_ids=input_ids, adapter_names=entries, max_new_tokens=3, do_sample=False, pad_token_id=0
        )
        for row, entry in enumerate(entries):
            with adapter_model.disable_adapter() if entry == BASE else _stack(adapter_model, entry):
                alone = adapter_model.generate(
                    input_ids=input_ids[row : row + 1], max_new_tokens=3, do_sample=False, pad_token_id=0
                )
            assert torch.equal(generated[row : row + 1], alone)


class _stack:
    """Activate a stack for a block."""

    def __init__(self, adapter_model: AdapterModel, entry: str | list[str]) -> None:
        self.adapter_model, self.entry = adapter_model, entry

    def __enter__(self) -> None:
        self.before = self.adapter_model.active_adapters
        self.adapter_model.set_adapter(self.entry)

    def __exit__(self, *exc: object) -> None:
        self.adapter_model.set_adapter(self.before)


def test_training_moves_only_the_active_adapter():
    adapter_model = stacked_model("llama")
    adapter_model.set_adapter("wide")
    adapter_model.train()
    trainable = [p for p in adapter_model.parameters() if p.requires_grad]
    names = {n for n, p in adapter_model.named_parameters() if p.requires_grad}
    assert names and all(".adapters.wide." in n for n in names)
    optimizer = torch.optim.SGD(trainable, lr=0.5)
    inputs = batch("llama", IDS)
    frozen = {n: p.clone() for n, p in adapter_model.named_parameters() if not p.requires_grad}
    losses = []
    for _ in range(3):
        out = adapter_model(**inputs, labels=inputs["input_ids"])
        losses.append(out.loss.item())
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert losses[-1] < losses[0]
    assert all(torch.equal(p, frozen[n]) for n, p in adapter_model.named_parameters() if n in frozen)
