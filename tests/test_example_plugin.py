"""The example plugin examples/tt-row-scale, built and installed for real, works with no change to tt_core.

It is installed with pip into a temporary folder. ``tt plugins`` runs in a
subprocess with that folder on PYTHONPATH; the other tests put it on sys.path
and swap in a fresh plugin manager that loads the entry points from it, and
put everything back afterwards, so the rest of the suite never sees it.
"""

from __future__ import annotations

import copy
import importlib
import importlib.util
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from installing import environment_with, pip_install, tt_command
from models import FAMILIES, adapter_state, batch, build, logits, reference_logits

import tt_core.plugins
from tt_core import AdapterLayer, AdapterModel, testing
from tt_core.plugins import PluginManager
from tt_plugins.trainable_tokens import TrainableTokensConfig

EXAMPLE = Path(__file__).parents[1] / "examples" / "tt-row-scale"
SCALED = [3, 17, 64, 127]
TOKENS = [17, 64, 100]  # shares rows 17 and 64 with SCALED, so the order of a stack matters
BOTH_ORDERS = [["tokens", "scale"], ["scale", "tokens"]]


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The folder pip installed tt-row-scale into (built from a copy: setuptools writes build/ beside it)."""
    source = tmp_path_factory.mktemp("source") / "tt-row-scale"
    shutil.copytree(EXAMPLE, source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    target = tmp_path_factory.mktemp("site")
    pip_install(target, str(source))
    return target


@pytest.fixture(scope="module")
def manager(installed: Path):
    """A fresh plugin manager loading every entry point, the example's included, as the global one."""
    modules = set(sys.modules)
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(installed))
        importlib.invalidate_caches()
        fresh = PluginManager()
        fresh.load_entry_points(strict=True)
        patch.setattr(tt_core.plugins, "_manager", fresh)
        yield fresh
    for name in set(sys.modules) - modules:
        if name.split(".")[0] in ("tt_row_scale", "row_scale_tests"):
            del sys.modules[name]


@pytest.fixture(scope="module")
def row_scale(manager):
    """The installed package, imported from the temporary folder."""
    package = importlib.import_module("tt_row_scale")
    assert "examples" not in package.__file__, "tt_row_scale must come from the installed copy"
    return package


# ---------------------------------------------------------------- installing
def test_pip_installs_it_as_its_own_distribution(installed):
    (info,) = installed.glob("tt_row_scale-*.dist-info")
    assert "Name: tt-row-scale\n" in (info / "METADATA").read_text()
    assert "[tt_core.plugins]\nrow_scale = tt_row_scale.plugin" in (info / "entry_points.txt").read_text()
    assert sorted(p.name for p in installed.iterdir() if "dist-info" not in p.name) == ["tt_row_scale"]


def test_tt_plugins_lists_it_with_its_distribution(installed):
    result = subprocess.run(
        [tt_command(), "plugins", "--json"], capture_output=True, text=True, env=environment_with(installed)
    )
    assert result.returncode == 0, result.stderr
    listed = json.loads(result.stdout)
    assert listed["failures"] == []
    methods = {method["name"]: method for method in listed["methods"]}
    assert methods["row_scale"] == {
        "name": "row_scale",
        "plugin": "row_scale",
        "config": "tt_row_scale.config.RowScaleConfig",
        "distribution": "tt-row-scale",
        "version": "0.1.0",
    }
    assert {"trainable_tokens", "lora_embedding"} <= set(methods)


def test_tt_disable_plugins_leaves_it_out(installed, monkeypatch):
    monkeypatch.syspath_prepend(str(installed))
    importlib.invalidate_caches()
    monkeypatch.setenv("TT_DISABLE_PLUGINS", "row_scale")
    manager = PluginManager()
    manager.load_entry_points(strict=True)
    assert "row_scale" not in manager.methods
    assert "trainable_tokens" in manager.methods


def test_the_method_comes_from_the_installed_distribution(manager, row_scale):
    method = manager.methods["row_scale"]
    assert (method.plugin, method.distribution, method.version) == ("row_scale", "tt-row-scale", "0.1.0")
    assert method.config_class is row_scale.RowScaleConfig


# ---------------------------------------------------------------- the conformance kit
@pytest.mark.parametrize("family", testing.FAMILIES)
@pytest.mark.parametrize("check", testing.CHECKS)
def test_the_example_passes_its_own_conformance_tests(row_scale, check, family):
    spec = importlib.util.spec_from_file_location("row_scale_tests", EXAMPLE / "tests" / "test_row_scale.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.test_row_scale_conforms(check, family)


# ---------------------------------------------------------------- using it
def _with_adapters(family: str, row_scale):
    """A model with a random row-scale adapter "scale" and a random trainable-tokens one "tokens"."""
    model = build(family)
    reference = copy.deepcopy(model)
    adapter_model = AdapterModel(model)
    adapter_model.add_adapter("scale", row_scale.RowScaleConfig(token_indices=SCALED, init_weights=False))
    adapter_model.add_adapter("tokens", TrainableTokensConfig(token_indices=TOKENS, init_weights=False))
    return adapter_model, reference, batch(family, SCALED + TOKENS)


def _fold(adapter_model: AdapterModel, reference, family: str, stack: list[str]) -> torch.Tensor:
    """The effective weight, folded by hand: row scaling multiplies rows, trainable tokens replace them."""
    weight = reference.get_input_embeddings().weight.detach().clone()
    for name in stack:
        state = adapter_state(adapter_model, family, name)
        if name == "scale":
            weight[SCALED] = weight[SCALED] * state.row_scale.detach().unsqueeze(-1)
        else:
            weight[TOKENS] = state.trainable_tokens_rows.detach()
    return weight


def _expected(adapter_model, reference, family, inputs, stack) -> torch.Tensor:
    with torch.no_grad():
        return reference_logits(reference, family, _fold(adapter_model, reference, family, stack), inputs)


def _run(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return logits(model, inputs)


@pytest.mark.parametrize("family", ["llama", "llama_tied"])
def test_it_stacks_with_trainable_tokens_in_both_orders(row_scale, family):
    adapter_model, reference, inputs = _with_adapters(family, row_scale)
    outputs = []
    for stack in [["scale"], *BOTH_ORDERS]:
        adapter_model.set_adapter(stack)
        outputs.append(_run(adapter_model, inputs))
        expected = _expected(adapter_model, reference, family, inputs, stack)
        torch.testing.assert_close(outputs[-1], expected, atol=1e-5, rtol=1e-5)
    assert (outputs[1] - outputs[2]).abs().max() > 1e-3, "the two orders must really differ"
    tied = [adapter_model.model.get_submodule(name) for name in FAMILIES[family][2]]
    assert all(isinstance(module, AdapterLayer) for module in tied)


@pytest.mark.parametrize("family", ["llama", "llama_tied"])
def test_training_moves_only_the_active_adapters(row_scale, family):
    adapter_model, reference, inputs = _with_adapters(family, row_scale)
    adapter_model.add_adapter("idle", row_scale.RowScaleConfig(token_indices=SCALED, init_weights=False))
    adapter_model.set_adapter(["tokens", "scale"])
    before = {name: p.detach().clone() for name, p in adapter_model.named_parameters()}
    trainable = {name for name, p in adapter_model.named_parameters() if p.requires_grad}
    assert trainable and all(".tokens." in name or ".scale." in name for name in trainable)
    optimizer = torch.optim.SGD([p for p in adapter_model.parameters() if p.requires_grad], lr=0.1)
    for _ in range(3):
        adapter_model(**inputs, labels=inputs["input_ids"]).loss.backward()
        for name, parameter in adapter_model.named_parameters():
            assert (parameter.grad is not None) == (name in trainable), name
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    for name, parameter in adapter_model.named_parameters():
        moved = not torch.equal(parameter, before[name])
        assert moved == (name in trainable), f"{name} moved: {moved}"
    expected = _expected(adapter_model, reference, family, inputs, ["tokens", "scale"])
    torch.testing.assert_close(_run(adapter_model, inputs), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["llama", "llama_tied"])
def test_it_saves_loads_and_merges(row_scale, family, tmp_path):
    adapter_model, reference, inputs = _with_adapters(family, row_scale)
    stack = ["scale", "tokens"]
    adapter_model.set_adapter(stack)
    expected = _expected(adapter_model, reference, family, inputs, stack)

    adapter_model.save_pretrained(tmp_path)
    entry = json.loads((tmp_path / "manifest.json").read_text())["adapters"]["scale"]
    assert (entry["method"], entry["plugin"]) == ("row_scale", "row_scale")
    assert (entry["distribution"], entry["distribution_version"]) == ("tt-row-scale", "0.1.0")
    loaded = AdapterModel.from_pretrained(build(family), tmp_path)
    assert loaded.active_adapters == stack
    torch.testing.assert_close(_run(loaded, inputs), expected, atol=1e-5, rtol=1e-5)

    weight = loaded.get_input_embeddings().weight
    base = weight.detach().clone()
    loaded.merge_adapter()
    torch.testing.assert_close(weight.detach(), _fold(loaded, reference, family, stack), atol=1e-6, rtol=0)
    torch.testing.assert_close(_run(loaded, inputs), expected, atol=1e-5, rtol=1e-5)
    loaded.unmerge_adapter()
    assert torch.equal(weight, base), "unmerging puts the exact base rows back"
    plain = loaded.merge_and_unload()
    assert not any(isinstance(module, AdapterLayer) for module in plain.modules())
    if family == "llama_tied":
        assert plain.lm_head.weight is plain.get_input_embeddings().weight
    torch.testing.assert_close(_run(plain, inputs), expected, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- the README
# docs/plugins.md, which is this package file by file, is checked by tests/test_plugin_docs.py.
def test_the_readme_snippet_runs(row_scale):
    readme = (EXAMPLE / "README.md").read_text()
    (block,) = re.findall(r"```python\n(.*?)```", readme, flags=re.S)
    namespace = {"model": build("llama_tied")}
    exec(compile(block, "README.md", "exec"), namespace)
    adapter_model = namespace["adapter_model"]
    assert isinstance(adapter_model, AdapterModel)
    assert isinstance(adapter_state(adapter_model, "llama_tied"), row_scale.RowScaleLayer)
