"""The hook contract as a plugin author meets it: each trap the issue found, now closed."""

from __future__ import annotations

import copy
import dataclasses
import os
import subprocess
import sys
from pathlib import Path
from typing import ClassVar

import pytest
import torch
from models import batch, build, logits
from numerics import assert_same_math
from torch import nn

import tt_core
import tt_core.disk.manifest
from tt_core import AdapterConfig, AdapterModel, AdapterState, get_adapter_model, hookimpl
from tt_core.api.errors import PluginError
from tt_core.plugins import PluginManager
from tt_plugins.lora_embedding import LoraEmbeddingConfig
from tt_plugins.trainable_tokens import TrainableTokensConfig


# ------------------------------------------------------- a small third method
@dataclasses.dataclass
class AddRowsConfig(AdapterConfig):
    """Adds a trainable vector to chosen rows."""

    method: ClassVar[str] = "add_rows"
    token_indices: list[int] = dataclasses.field(default_factory=list)
    target_modules: list[str] | None = None


class AddRowsState(AdapterState):
    additive = True

    def __init__(self, weight: torch.Tensor, token_indices: list[int]) -> None:
        super().__init__()
        self.register_buffer("token_indices", torch.tensor(token_indices), persistent=False)
        self.delta = nn.Parameter(torch.full((len(token_indices), weight.shape[1]), 0.5))
        self.fail_merge = False

    def touched_rows(self) -> torch.Tensor:
        return self.token_indices

    def embed(self, input_ids, output, base_layer):
        hit = input_ids.unsqueeze(-1) == self.token_indices
        return output + (hit.to(output.dtype) @ self.delta).to(output.dtype)

    def project(self, hidden, output, base_layer, earlier):
        return output.index_add(-1, self.token_indices, hidden @ self.delta.T)

    def merge_into(self, weight):
        if self.fail_merge:
            raise RuntimeError("merge failed on purpose")
        weight.data.index_add_(0, self.token_indices, self.delta.detach().to(weight.dtype))

    def unmerge_from(self, weight):
        weight.data.index_add_(0, self.token_indices, -self.delta.detach().to(weight.dtype))


class AddRowsPlugin:
    """A minimal method: register_methods and create_layer; the core defaults do the rest."""

    @hookimpl
    def register_methods(self, register):
        register(AddRowsConfig)

    @hookimpl
    def create_layer(self, config, adapter_name, target_name, base_layer):
        return AddRowsState(base_layer.weight, config.token_indices)


@dataclasses.dataclass
class RogueConfig(AdapterConfig):
    method: ClassVar[str] = "rogue"
    target_modules: list[str] | None = None


class RoguePlugin:
    """Answers every hook for every config with a falsy value, as a careless plugin would."""

    @hookimpl
    def register_methods(self, register):
        register(RogueConfig)

    @hookimpl
    def detect_target(self, model, config):
        return []

    @hookimpl
    def create_layer(self, config, adapter_name, target_name, base_layer):
        return None

    @hookimpl
    def tie_handler(self, model, config, target_name, base_layer):
        return []

    @hookimpl
    def merge(self, state, weight, unmerge):
        return False


@pytest.fixture
def register():
    """Register run-time plugins on the process-wide manager, and take them off afterwards."""
    manager = tt_core.get_plugin_manager()
    added = []

    def add(plugin, name):
        manager.register(plugin, name=name)
        added.append(name)
        return plugin

    yield add
    for name in added:
        manager.unregister(name=name)


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in model.state_dict(keep_vars=True).items()}


def _same(before: dict[str, torch.Tensor], model: nn.Module, atol: float = 0.0) -> bool:
    after = model.state_dict()
    return before.keys() == after.keys() and all(
        torch.allclose(before[k], after[k], rtol=0, atol=atol) for k in before
    )


# ------------------------------------------------------- owner-only hooks
def test_a_plugin_answering_for_every_config_cannot_take_over_another_method(register):
    register(RoguePlugin(), "rogue")
    adapter_model = get_adapter_model(
        build("llama_tied"), TrainableTokensConfig(token_indices=[5, 6], init_weights=False)
    )
    # The tie is still found (the rogue's [] is not asked) and the merge still happens (its False neither).
    assert type(adapter_model.model.lm_head).__name__ == "AdapterLayer"
    inputs = batch("llama", [5, 6])
    with torch.no_grad():
        expected = logits(adapter_model, inputs)
        adapter_model.merge_adapter()
        torch.testing.assert_close(logits(adapter_model, inputs), expected, atol=1e-5, rtol=1e-5)
    assert adapter_model.merged_adapters == ["default"]
    # Its own config gets its own (useless) answers, and a clear error.
    with pytest.raises(PluginError, match="no plugin found a module to adapt for method 'rogue'"):
        adapter_model.add_adapter("mine", RogueConfig())


def test_a_minimal_method_needs_only_register_methods_and_create_layer(register):
    register(AddRowsPlugin(), "add_rows")
    model = build("llama_tied")
    reference = copy.deepcopy(model)
    adapter_model = get_adapter_model(model, AddRowsConfig(token_indices=[5, 6]))
    assert type(adapter_model.model.lm_head).__name__ == "AdapterLayer"  # the default tie_handler
    with torch.no_grad():
        reference.model.embed_tokens.weight[[5, 6]] += 0.5
    inputs = batch("llama", [5, 6])
    with torch.no_grad():
        torch.testing.assert_close(
            logits(adapter_model, inputs), logits(reference, inputs), atol=1e-5, rtol=0
        )
        adapter_model.merge_adapter()  # the default merge: the state's merge_into
        torch.testing.assert_close(
            logits(adapter_model, inputs), logits(reference, inputs), atol=1e-5, rtol=0
        )


# ------------------------------------------------------- registration
def _fake_distribution(root: Path, name: str, entry_points: str) -> None:
    info = root / f"{name.replace('-', '_')}-0.3.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.3\n")
    (info / "entry_points.txt").write_text("[tt_core.plugins]\n" + entry_points)


def _duplicate_plugin(tmp_path: Path) -> None:
    (tmp_path / "duplicate_tokens.py").write_text(
        "import dataclasses\n"
        "from typing import ClassVar\n"
        "from tt_core import AdapterConfig, hookimpl\n"
        "@dataclasses.dataclass\n"
        "class Clash(AdapterConfig):\n"
        "    method: ClassVar[str] = 'trainable_tokens'\n"
        "    target_modules: list | None = None\n"
        "@hookimpl\n"
        "def register_methods(register):\n"
        "    register(Clash)\n"
    )
    _fake_distribution(tmp_path, "clash-plugin", "zz_clash = duplicate_tokens\n")


def test_a_second_plugin_claiming_a_method_name_is_skipped_and_reported(tmp_path, monkeypatch):
    _duplicate_plugin(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    manager = PluginManager()
    with pytest.warns(UserWarning, match="zz_clash.*skipped.*already provided by plugin 'trainable_tokens'"):
        manager.load_entry_points(strict=False)
    assert [name for name, _ in manager.failures] == ["zz_clash"]
    assert manager.get_plugin("zz_clash") is None
    assert manager.methods["trainable_tokens"].config_class is TrainableTokensConfig
    assert manager.methods["trainable_tokens"].distribution == "tt-adapters"


def test_tt_plugins_reports_a_clash_in_one_line_without_a_traceback(tmp_path):
    _duplicate_plugin(tmp_path)
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    code = "from tt_core.cli import main; raise SystemExit(main(['plugins']))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert result.returncode == 1
    assert "Traceback" not in result.stdout + result.stderr
    assert "zz_clash" in result.stdout + result.stderr
    assert "trainable_tokens" in result.stdout


def test_register_methods_is_called_once_per_plugin_through_pluggy():
    calls = []

    class Counting:
        @hookimpl
        def register_methods(self, register):
            calls.append(register.plugin_name)
            register(AddRowsConfig)

    manager = PluginManager()
    manager.load_entry_points()
    manager.register(Counting(), name="counting")
    assert manager.methods["add_rows"].plugin == "counting"
    assert "add_rows" in manager.methods  # reading the table again calls no hook
    assert calls == ["counting"]
    shipped = manager.methods["lora_embedding"]
    assert (shipped.distribution, shipped.version) == ("tt-adapters", tt_core_version())


def tt_core_version() -> str:
    import importlib.metadata

    return importlib.metadata.version("tt-adapters")


def test_the_method_name_is_written_once_on_the_config_class():
    class OldStyle:
        @hookimpl
        def register_methods(self, register):
            register("add_rows", AddRowsConfig)

    with pytest.raises(TypeError, match="takes only the config class"):
        PluginManager().register(OldStyle(), name="old")


def test_tt_disable_plugins_leaves_plugins_out_by_name(monkeypatch):
    monkeypatch.setenv("TT_DISABLE_PLUGINS", "lora_embedding, nothing_by_that_name")
    manager = PluginManager()
    manager.load_entry_points()
    assert "lora_embedding" not in manager.methods
    assert "trainable_tokens" in manager.methods
    assert manager.failures == []


def test_saves_record_the_plugins_distribution(tmp_path):
    adapter_model = get_adapter_model(build("llama"), TrainableTokensConfig(token_indices=[5]))
    adapter_model.save_pretrained(tmp_path)
    entry = tt_core.disk.manifest.read(tmp_path).adapters["default"]
    assert (entry["distribution"], entry["distribution_version"]) == ("tt-adapters", tt_core_version())


# ------------------------------------------------------- merge across sites
def test_a_declined_tie_makes_merge_refuse_instead_of_changing_the_head(register):
    class Untied(AddRowsPlugin):
        @hookimpl
        def tie_handler(self, model, config, target_name, base_layer):
            return []

    register(Untied(), "add_rows")
    adapter_model = get_adapter_model(build("llama_tied"), AddRowsConfig(token_indices=[5]))
    assert type(adapter_model.model.lm_head).__name__ == "Linear"
    before = _snapshot(adapter_model.model)
    inputs = batch("llama", [5])
    with torch.no_grad():
        expected = logits(adapter_model, inputs)
    with pytest.raises(
        ValueError, match=r"not \['lm_head'\], which hold the same weight.*Nothing was merged"
    ):
        adapter_model.merge_adapter()
    with pytest.raises(ValueError, match="which hold the same weight"):
        adapter_model.merge_and_unload()
    assert _same(before, adapter_model.model) and adapter_model.merged_adapters == []
    with torch.no_grad():
        assert torch.equal(logits(adapter_model, inputs), expected)


def test_a_merge_failing_on_the_second_site_undoes_the_first(register):
    register(AddRowsPlugin(), "add_rows")
    model = build("llama")
    adapter_model = get_adapter_model(
        model, AddRowsConfig(token_indices=[5], target_modules=["embed_tokens", "lm_head"])
    )
    sites = adapter_model.adapter_record("default").sites
    assert [site.modules for site in sites] == [["model.embed_tokens"], ["lm_head"]]
    sites[1].state.fail_merge = True
    before = _snapshot(model)
    with pytest.raises(RuntimeError, match="merge failed on purpose"):
        adapter_model.merge_adapter()
    assert _same(before, model, atol=1e-6)  # adding then subtracting 0.5 rounds
    assert adapter_model.merged_adapters == [] and not sites[0].state.merged


def test_an_unmerge_the_plugin_does_not_confirm_is_an_error(register):
    class ForgetsUnmerge(AddRowsPlugin):
        @hookimpl
        def merge(self, state, weight, unmerge):
            if unmerge:
                return None  # falls through to the default, which unmerges: fine
            state.merge_into(weight)
            return True

    class RefusesUnmerge(AddRowsPlugin):
        @hookimpl
        def merge(self, state, weight, unmerge):
            if unmerge:
                return False
            state.merge_into(weight)
            return True

    register(ForgetsUnmerge(), "add_rows")
    adapter_model = get_adapter_model(build("llama"), AddRowsConfig(token_indices=[5]))
    before = _snapshot(adapter_model.model)
    adapter_model.merge_adapter()
    adapter_model.unmerge_adapter()
    assert _same(before, adapter_model.model, atol=1e-6)
    tt_core.get_plugin_manager().unregister(name="add_rows")
    register(RefusesUnmerge(), "add_rows")
    adapter_model.merge_adapter()
    with pytest.raises(RuntimeError, match="did not unmerge model.embed_tokens"):
        adapter_model.unmerge_adapter()
    assert adapter_model.merged_adapters == ["default"]  # the model still says what its weights hold


def test_merge_writes_to_the_weight_the_model_holds_after_load_state_dict_assign():
    adapter_model = get_adapter_model(
        build("llama"), TrainableTokensConfig(token_indices=[5], init_weights=False)
    )
    model = adapter_model.model
    fresh = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    model.load_state_dict(fresh, assign=True)
    inputs = batch("llama", [5])
    with torch.no_grad():
        expected = logits(adapter_model, inputs)
        adapter_model.merge_adapter()
        assert torch.equal(
            model.model.embed_tokens.base_layer.weight[5],
            model.model.embed_tokens.adapters["default"].trainable_tokens_rows[0],
        )
        assert_same_math(logits(adapter_model, inputs), expected)


def test_the_padding_row_rule_covers_every_module_sharing_the_weight():
    model = build("opt")  # tied, pad id 1
    before = _snapshot(model)
    for token_indices in ({"embed_tokens": [1]}, {"lm_head": [1], "embed_tokens": [1]}, {"lm_head": [1]}):
        with pytest.raises(
            ValueError, match="token index 1 is the padding_idx of model.decoder.embed_tokens"
        ):
            get_adapter_model(model, TrainableTokensConfig(token_indices=token_indices))
        assert _same(before, model)
        assert type(model.lm_head).__name__ == "Linear"


# ------------------------------------------------------- disable_adapter
def test_state_changing_verbs_are_refused_inside_disable_adapter_and_the_base_comes_back_exact():
    model = build("llama_tied")
    base = _snapshot(model)
    adapter_model = AdapterModel(model)
    adapter_model.add_adapter("default", TrainableTokensConfig(token_indices=[5], init_weights=False))
    adapter_model.add_adapter("other", TrainableTokensConfig(token_indices=[6], init_weights=False))
    adapter_model.set_adapter("default")
    adapter_model.merge_adapter()
    with adapter_model.disable_adapter():
        for call in (
            lambda: adapter_model.set_adapter("other"),
            lambda: adapter_model.merge_adapter(),
            lambda: adapter_model.unmerge_adapter(),
            lambda: adapter_model.delete_adapter("default"),
            lambda: adapter_model.unload(),
            lambda: adapter_model.merge_and_unload(),
        ):
            with pytest.raises(RuntimeError, match="cannot run inside `with disable_adapter\\(\\):`"):
                call()
        with adapter_model.disable_adapter():  # nesting is harmless
            pass
    assert adapter_model.merged_adapters == ["default"] and adapter_model.active_adapters == ["default"]
    adapter_model.unmerge_adapter()
    adapter_model.unload()
    assert _same(base, model)


# ------------------------------------------------------- safe_merge
def test_safe_merge_refuses_what_would_overflow_the_weight():
    adapter_model = get_adapter_model(build("llama_tied"), LoraEmbeddingConfig(r=2), adapter_name="big")
    state = adapter_model.model.model.embed_tokens.adapters["big"]
    with torch.no_grad():
        state.lora_embedding_A.fill_(1e20)  # finite factors, an infinite product
        state.lora_embedding_B.fill_(1e20)
    before = _snapshot(adapter_model.model)
    with pytest.raises(
        ValueError, match="merging adapter 'big' would write NaN or inf into model.embed_tokens"
    ):
        adapter_model.merge_adapter(safe_merge=True)
    assert _same(before, adapter_model.model) and adapter_model.merged_adapters == []


def test_safe_merge_checks_in_the_weights_dtype():
    model = build("llama_tied").half()
    adapter_model = get_adapter_model(model, TrainableTokensConfig(token_indices=[5]))
    with torch.no_grad():
        adapter_model.model.model.embed_tokens.adapters["default"].trainable_tokens_rows.fill_(
            1e6
        )  # fine in fp32
    before = _snapshot(model)
    with pytest.raises(
        ValueError, match=r"would write NaN or inf into model.embed_tokens.weight \(float16\)"
    ):
        adapter_model.merge_adapter(safe_merge=True)
    with pytest.raises(ValueError, match="would write NaN or inf"):
        adapter_model.merge_and_unload(safe_merge=True)
    assert _same(before, model)


# ------------------------------------------------------- argument types
@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (lambda m: m.set_adapter(None), TypeError, "adapter_name must be an adapter name or a list"),
        (lambda m: m.set_adapter(3), TypeError, "adapter_name must be an adapter name or a list"),
        (lambda m: m.set_adapter(["default", 3]), TypeError, "adapter_name must be"),
        (lambda m: m.merge_adapter(5), TypeError, "adapter_names must be"),
        (lambda m: m.merge_and_unload(adapter_names={"default"}), TypeError, "adapter_names must be"),
        (lambda m: m.delete_adapter(None), TypeError, "adapter_name must be"),
        (lambda m: m.save_pretrained("/nonexistent", selected_adapters=7), TypeError, "selected_adapters"),
        (lambda m: m.add_adapter(3, TrainableTokensConfig(token_indices=[1])), ValueError, "adapter name 3"),
        (lambda m: m.add_adapter("x", {"token_indices": [1]}), TypeError, "config must be an adapter config"),
    ],
)
def test_public_verbs_refuse_wrong_types_naming_the_argument(call, error, message):
    adapter_model = get_adapter_model(build("llama"), TrainableTokensConfig(token_indices=[5]))
    before = _snapshot(adapter_model.model)
    with pytest.raises(error, match=message):
        call(adapter_model)
    assert _same(before, adapter_model.model) and adapter_model.active_adapters == ["default"]


def test_loading_an_adapter_whose_plugin_is_missing_names_the_package_to_install(tmp_path, monkeypatch):
    get_adapter_model(build("llama"), TrainableTokensConfig(token_indices=[5])).save_pretrained(tmp_path)
    monkeypatch.setenv("TT_DISABLE_PLUGINS", "trainable_tokens")
    without = PluginManager()
    without.load_entry_points()
    monkeypatch.setattr(tt_core.formats.native, "get_plugin_manager", lambda: without)
    model = build("llama")
    with pytest.raises(
        ValueError,
        match="method 'trainable_tokens', which no installed plugin provides.*pip install tt-adapters",
    ):
        AdapterModel.from_pretrained(model, tmp_path)
    assert type(model.model.embed_tokens).__name__ == "Embedding"
