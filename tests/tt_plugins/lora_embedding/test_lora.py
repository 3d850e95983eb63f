"""LoRA on the embedding computes what the base model computes with W + scaling * (B @ A).T."""

import copy
import importlib.metadata
import json
import math

import pytest
import torch
from models import FAMILIES, VOCAB, WIDTH, adapter_state, batch, build, logits, reference_logits
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

import tt_core
from tt_core import AdapterLayer, AdapterModel, get_adapter_model
from tt_plugins.lora_embedding import LoraEmbeddingConfig, LoraEmbeddingLayer
from tt_plugins.lora_embedding import plugin as lora_plugin

# 0 and 1 are padding ids in some families: their rows must get no gradient.
TOKENS = [0, 1, 3, 17, 64, 127]
RANK = 4


# ---------------------------------------------------------------- config
def test_config_defaults_and_scaling():
    config = LoraEmbeddingConfig()
    assert (config.r, config.lora_alpha, config.target_modules, config.init_weights) == (8, 8, None, True)
    assert config.method == "lora_embedding"
    assert config.scaling == 1.0  # PEFT's LoraConfig defaults: r=8, lora_alpha=8
    assert LoraEmbeddingConfig(r=4, lora_alpha=6).scaling == 1.5
    assert isinstance(config, tt_core.AdapterConfig)
    assert LoraEmbeddingConfig(target_modules="embed_tokens").target_modules == "embed_tokens"  # a regex


@pytest.mark.parametrize("r", [0, -2, 2.5, True, "8", None])
def test_config_rejects_a_bad_rank(r):
    with pytest.raises(ValueError, match=r"r=.*whole number >= 1"):
        LoraEmbeddingConfig(r=r)


@pytest.mark.parametrize("alpha", [0, -1.0, math.nan, math.inf, "16", True, None])
def test_config_rejects_a_bad_alpha(alpha):
    with pytest.raises(ValueError, match=r"lora_alpha=.*positive number"):
        LoraEmbeddingConfig(lora_alpha=alpha)


def test_config_stores_plain_numbers():
    import numpy as np

    config = LoraEmbeddingConfig(r=np.int64(4), lora_alpha=np.float32(2.5))
    assert type(config.r) is int and type(config.lora_alpha) is float
    assert json.loads(json.dumps(config.to_dict())) == config.to_dict()


def test_config_round_trips_through_the_plugin_manager():
    config = LoraEmbeddingConfig(r=3, lora_alpha=5, target_modules=["shared"], init_weights=False)
    data = config.to_dict()
    assert data["method"] == "lora_embedding"
    assert tt_core.get_plugin_manager().config_from_dict(data) == config


# ---------------------------------------------------------------- plugin
def test_plugin_is_found_through_its_entry_point():
    manager = tt_core.get_plugin_manager()
    assert manager.methods["lora_embedding"].plugin == "lora_embedding"
    assert manager.methods["lora_embedding"].config_class is LoraEmbeddingConfig
    assert manager.get_plugin("lora_embedding") is lora_plugin
    points = {ep.name: ep.value for ep in importlib.metadata.entry_points(group="tt_core.plugins")}
    assert points["lora_embedding"] == "tt_plugins.lora_embedding.plugin"


def test_the_lora_config_reaches_the_lora_plugin_and_the_core_defaults():
    model = build("llama_tied")
    embedding = model.get_input_embeddings()
    manager = tt_core.get_plugin_manager()
    hooks = manager.hooks_for("lora_embedding")
    config = LoraEmbeddingConfig(r=RANK)
    # Targets and ties come from the core defaults; the plugin answers only create_layer.
    assert hooks.detect_target(model=model, config=config) == ["model.embed_tokens"]
    assert hooks.tie_handler(
        model=model, config=config, target_name="model.embed_tokens", base_layer=embedding
    ) == ["lm_head"]
    state = hooks.create_layer(
        config=config, adapter_name="a", target_name="model.embed_tokens", base_layer=embedding
    )
    assert isinstance(state, LoraEmbeddingLayer)
    assert {impl.function.__name__ for impl in manager.hook.create_layer.get_hookimpls()} >= {"create_layer"}
    assert not hasattr(lora_plugin, "detect_target") and not hasattr(lora_plugin, "merge")


# ---------------------------------------------------------------- layout
@pytest.mark.parametrize("family", list(FAMILIES))
def test_targets_the_input_embedding_and_every_module_tied_to_it(family):
    model = build(family)
    adapter_model = get_adapter_model(model, LoraEmbeddingConfig(r=RANK))
    _, embedding, tied = FAMILIES[family]
    wrapped = {name for name, module in model.named_modules() if isinstance(module, AdapterLayer)}
    assert wrapped == {embedding, *tied}
    states = {id(model.get_submodule(name).adapters["default"]) for name in wrapped}
    assert len(states) == 1, "tied modules must share one adapter state"
    trainable = {name.rsplit(".", 1)[-1] for name, p in adapter_model.named_parameters() if p.requires_grad}
    assert trainable == {"lora_embedding_A", "lora_embedding_B"}
    state = adapter_state(adapter_model, family)
    assert state.lora_embedding_A.shape == (RANK, VOCAB)
    assert state.lora_embedding_B.shape == (WIDTH, RANK)
    assert state.additive and state.touched_rows() is None


def test_a_target_without_a_2d_weight_is_refused_and_the_model_is_untouched():
    model = build("llama")
    with pytest.raises(ValueError, match=r"cannot adapt model\.norm"):
        get_adapter_model(model, LoraEmbeddingConfig(target_modules=["model.norm"]))
    assert not any(isinstance(module, AdapterLayer) for module in model.modules())
    assert all(p.requires_grad for p in model.parameters())


def test_a_missing_target_names_the_embeddings_that_exist():
    with pytest.raises(ValueError, match=r"'nope' does not exist.*model\.embed_tokens"):
        get_adapter_model(build("llama"), LoraEmbeddingConfig(target_modules=["nope"]))


# ---------------------------------------------------------------- forward
@pytest.mark.parametrize("family", ["llama", "llama_tied", "gpt2", "t5", "gemma3", "opt", "custom"])
def test_outputs_and_gradients_equal_the_base_model_with_the_update_added(family):
    model = build(family)
    reference = copy.deepcopy(model)
    inputs = batch(family, TOKENS)
    config = LoraEmbeddingConfig(r=RANK, lora_alpha=6, init_weights=False)
    adapter_model = get_adapter_model(model, config)
    state = adapter_state(adapter_model, family)

    out = logits(adapter_model, inputs)
    out.square().mean().backward()

    lora_a = state.lora_embedding_A.detach().clone().requires_grad_(True)
    lora_b = state.lora_embedding_B.detach().clone().requires_grad_(True)
    base_weight = reference.get_input_embeddings().weight.detach()
    effective = base_weight + config.scaling * (lora_b @ lora_a).T
    expected = reference_logits(reference, family, effective, inputs)
    expected.square().mean().backward()

    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(state.lora_embedding_A.grad, lora_a.grad, atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(state.lora_embedding_B.grad, lora_b.grad, atol=1e-6, rtol=1e-4)
    assert lora_a.grad.abs().sum() > 0 and lora_b.grad.abs().sum() > 0


@pytest.mark.parametrize("family", ["opt", "gemma3"])
def test_padding_positions_teach_the_embedding_update_nothing(family):
    model = build(family)
    embedding = model.get_input_embeddings()
    padding_idx = embedding.padding_idx
    adapter_model = get_adapter_model(model, LoraEmbeddingConfig(r=RANK, init_weights=False))
    state = adapter_state(adapter_model, family)
    ids = torch.tensor([[padding_idx, padding_idx]])
    out = adapter_model.get_input_embeddings()(ids)
    # the forward still looks up the updated padding row, as the base model with W_eff would
    scale = getattr(embedding, "embed_scale", 1.0)
    torch.testing.assert_close(out[0, 0], (embedding.weight + state.delta_weight())[padding_idx] * scale)
    out.square().sum().backward()
    assert not state.lora_embedding_A.grad.any() and not state.lora_embedding_B.grad.any()


@pytest.mark.parametrize("family", ["llama", "llama_tied", "t5", "gemma3", "custom"])
def test_init_weights_true_is_a_no_op_and_false_is_not(family):
    model = build(family)
    inputs = batch(family, TOKENS)
    with torch.no_grad():
        before = logits(model, inputs)
    adapter_model = get_adapter_model(model, LoraEmbeddingConfig(r=RANK))
    torch.testing.assert_close(logits(adapter_model, inputs), before, atol=1e-5, rtol=1e-5)
    adapter_model.add_adapter("random", LoraEmbeddingConfig(r=RANK, init_weights=False))
    adapter_model.set_adapter("random")
    with torch.no_grad():
        assert (logits(adapter_model, inputs) - before).abs().max() > 1e-3


def test_a_no_op_start_still_trains():
    model = build("llama_tied")
    adapter_model = get_adapter_model(model, LoraEmbeddingConfig(r=RANK))
    state = adapter_state(adapter_model, "llama_tied")
    assert not state.lora_embedding_A.any() and state.lora_embedding_B.abs().sum() > 0
    logits(adapter_model, batch("llama_tied", TOKENS)).square().mean().backward()
    assert state.lora_embedding_A.grad.abs().sum() > 0


def test_scaled_embedding_scales_the_update():
    model = build("gemma3")
    embedding = model.get_input_embeddings()
    adapter_model = get_adapter_model(model, LoraEmbeddingConfig(r=RANK, lora_alpha=2, init_weights=False))
    state = adapter_state(adapter_model, "gemma3")
    ids = torch.tensor([[5, 6, 7]])
    with torch.no_grad():
        out = adapter_model.get_input_embeddings()(ids)
        expected = (embedding.weight + state.delta_weight())[ids] * embedding.embed_scale
    assert float(embedding.embed_scale) != 1.0
    torch.testing.assert_close(out, expected)


def test_tied_head_keeps_its_bias():
    model = build("custom")
    adapter_model = get_adapter_model(model, LoraEmbeddingConfig(r=RANK, init_weights=False))
    state = adapter_state(adapter_model, "custom")
    hidden = torch.randn(3, WIDTH)
    with torch.no_grad():
        out = adapter_model.model.head(hidden)
        base = model.head.base_layer
        expected = hidden @ (base.weight + state.delta_weight()).T + base.bias
    torch.testing.assert_close(out, expected)


def test_adapt_rows_gives_the_updated_rows():
    model = build("llama")
    adapter_model = get_adapter_model(model, LoraEmbeddingConfig(r=RANK, init_weights=False))
    state = adapter_state(adapter_model, "llama")
    ids = torch.tensor([4, 9, 100])
    rows = torch.randn(3, WIDTH)
    torch.testing.assert_close(state.adapt_rows(ids, rows), rows + state.delta_weight()[ids])


class _AllocationRecorder(TorchDispatchMode):
    """Records the shape of every freshly allocated tensor an aten op returns."""

    def __init__(self) -> None:
        super().__init__()
        self.shapes: list[tuple[int, ...]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        storages = {
            t.untyped_storage().data_ptr()
            for t in pytree.tree_leaves((args, kwargs))
            if isinstance(t, torch.Tensor)
        }
        for tensor in pytree.tree_leaves(out):
            if isinstance(tensor, torch.Tensor) and tensor.untyped_storage().data_ptr() not in storages:
                self.shapes.append(tuple(tensor.shape))
        return out


def test_forward_and_backward_build_no_vocabulary_by_width_tensor():
    model = build("llama_tied")
    adapter_model = get_adapter_model(model, LoraEmbeddingConfig(r=RANK, init_weights=False))
    inputs = batch("llama_tied", TOKENS)
    full = {(VOCAB, WIDTH), (WIDTH, VOCAB)}
    recorder = _AllocationRecorder()
    with recorder:
        logits(adapter_model, inputs).square().mean().backward()
        with torch.no_grad():
            logits(adapter_model, inputs)
    assert recorder.shapes, "the recorder saw nothing"
    assert not full & set(recorder.shapes)
    with recorder:  # the recorder does see a vocabulary x width tensor when one is built
        adapter_state(adapter_model, "llama_tied").delta_weight()
    assert full & set(recorder.shapes)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_base_keeps_fp32_factors_and_returns_base_dtype(dtype):
    model = build("llama_tied").to(dtype)
    adapter_model = get_adapter_model(model, LoraEmbeddingConfig(r=RANK, init_weights=False))
    state = adapter_state(adapter_model, "llama_tied")
    assert state.lora_embedding_A.dtype == state.lora_embedding_B.dtype == torch.float32
    out = logits(adapter_model, batch("llama_tied", TOKENS))
    assert out.dtype == dtype
    out.float().square().mean().backward()
    assert state.lora_embedding_A.grad.dtype == state.lora_embedding_B.grad.dtype == torch.float32


# ---------------------------------------------------------------- merge, save
@pytest.mark.parametrize("family", ["llama", "llama_tied", "t5"])
def test_merge_adds_the_update_once_and_unmerge_subtracts_it(family):
    model = build(family)
    inputs = batch(family, TOKENS)
    base_weight = model.get_input_embeddings().weight.detach().clone()
    adapter_model = get_adapter_model(model, LoraEmbeddingConfig(r=RANK, init_weights=False))
    state = adapter_state(adapter_model, family)
    with torch.no_grad():
        before = logits(adapter_model, inputs)
        adapter_model.merge_adapter()
        weight = adapter_model.get_input_embeddings().weight
        torch.testing.assert_close(weight, base_weight + state.delta_weight(), atol=1e-6, rtol=0)
        torch.testing.assert_close(logits(adapter_model, inputs), before, atol=1e-5, rtol=1e-5)
        adapter_model.unmerge_adapter()
        torch.testing.assert_close(weight, base_weight, atol=1e-6, rtol=0)
        torch.testing.assert_close(logits(adapter_model, inputs), before, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["llama_tied", "t5"])
def test_save_and_load_give_the_same_outputs(family, tmp_path):
    model = build(family)
    inputs = batch(family, TOKENS)
    adapter_model = get_adapter_model(model, LoraEmbeddingConfig(r=RANK, init_weights=False))
    with torch.no_grad():
        expected = logits(adapter_model, inputs)
    adapter_model.save_pretrained(tmp_path)
    loaded = AdapterModel.from_pretrained(build(family), tmp_path)
    assert loaded.adapter_configs["default"] == adapter_model.adapter_configs["default"]
    with torch.no_grad():
        torch.testing.assert_close(logits(loaded, inputs), expected)
