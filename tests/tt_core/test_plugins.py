"""Plugins: found by entry point, broken ones reported and skipped, run-time ones added."""

import dataclasses
import subprocess
import sys
from pathlib import Path
from typing import ClassVar

import pytest

import tt_core
from tt_core import AdapterConfig, hookimpl
from tt_core.api.errors import PluginError
from tt_core.plugins import PluginManager


def _fake_distribution(root: Path, entry_points: str) -> None:
    info = root / "fake_tt_plugin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: fake-tt-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[tt_core.plugins]\n" + entry_points)


def test_shipped_methods_come_from_entry_points():
    methods = tt_core.get_plugin_manager().methods
    assert methods["trainable_tokens"].plugin == "trainable_tokens"
    assert methods["trainable_tokens"].config_class.__name__ == "TrainableTokensConfig"


def test_a_broken_plugin_is_reported_by_name_and_skipped(tmp_path, monkeypatch):
    _fake_distribution(tmp_path, "broken = not_a_module_of_anyone\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    manager = PluginManager()
    with pytest.warns(UserWarning, match="tt plugin 'broken'.*skipped.*ModuleNotFoundError"):
        manager.load_entry_points(strict=False)
    assert [name for name, _ in manager.failures] == ["broken"]
    assert "trainable_tokens" in manager.methods


def test_strict_mode_turns_a_broken_plugin_into_an_error(tmp_path, monkeypatch):
    _fake_distribution(tmp_path, "broken = not_a_module_of_anyone\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(RuntimeError, match="tt plugin 'broken'"):
        PluginManager().load_entry_points(strict=True)


def test_a_plugin_registering_a_bad_method_is_skipped(tmp_path, monkeypatch):
    (tmp_path / "bad_method_plugin.py").write_text(
        "from tt_core import hookimpl\n@hookimpl\ndef register_methods(register):\n    register(dict)\n"
    )
    _fake_distribution(tmp_path, "bad = bad_method_plugin\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    manager = PluginManager()
    with pytest.warns(UserWarning, match="needs a subclass of tt_core.AdapterConfig"):
        manager.load_entry_points(strict=False)
    assert manager.get_plugin("bad") is None
    assert "bad" not in manager.methods


@dataclasses.dataclass
class EchoConfig(AdapterConfig):
    method: ClassVar[str] = "echo"
    target_modules: list[str] | None = None


class EchoPlugin:
    @hookimpl
    def register_methods(self, register):
        register(EchoConfig)


def test_run_time_plugins_add_methods():
    manager = PluginManager()
    manager.load_entry_points()
    manager.register(EchoPlugin(), name="echo")
    assert manager.methods["echo"].config_class is EchoConfig
    config = manager.config_from_dict({"method": "echo", "target_modules": ["x"]})
    assert config == EchoConfig(target_modules=["x"])
    with pytest.raises(PluginError, match="method 'nope', which no installed plugin provides"):
        manager.config_from_dict({"method": "nope"})


def test_the_core_never_imports_the_plugins():
    core = Path(tt_core.__file__).parent
    offenders = [p.name for p in core.glob("*.py") if "tt_plugins" in p.read_text()]
    assert offenders == []
    code = "import sys, tt_core; tt_core.AdapterModel; print('tt_plugins' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# ---------------------------------------------------------------- unregistering, hook names, the table
def test_unregistering_a_plugin_object_removes_its_methods():
    manager = PluginManager()
    plugin = EchoPlugin()
    manager.register(plugin, name="echo")
    manager.unregister(plugin)
    assert "echo" not in manager.methods
    with pytest.raises(PluginError, match="no installed plugin provides adapter method 'echo'"):
        manager.method_for(EchoConfig())
    assert manager.register(plugin, name="echo") == "echo"  # not "already provided by plugin 'echo'"
    assert manager.methods["echo"].plugin == "echo"
    manager.unregister(name="echo")
    assert "echo" not in manager.methods


class MisspelledPlugin:
    @hookimpl
    def register_methods(self, register):
        register(EchoConfig)

    @hookimpl
    def create_layr(self, config, adapter_name, target_name, base_layer):
        return None


def test_a_misspelled_hook_of_a_run_time_plugin_is_a_plugin_error_naming_both():
    manager = PluginManager()
    with pytest.raises(tt_core.PluginError) as caught:
        manager.register(MisspelledPlugin(), name="misspelled")
    message = str(caught.value)
    assert "plugin 'misspelled'" in message
    assert "'create_layr'" in message and "did you mean 'create_layer'" in message
    assert manager.get_plugin("misspelled") is None and "echo" not in manager.methods
    manager.register(EchoPlugin(), name="echo")  # nothing of the refused plugin is left behind
    assert manager.methods["echo"].plugin == "echo"


def _misspelled_distribution(tmp_path: Path) -> None:
    (tmp_path / "misspelled_plugin.py").write_text(
        "from tt_core import hookimpl\n"
        "@hookimpl\n"
        "def create_layr(config, adapter_name, target_name, base_layer):\n"
        "    return None\n"
    )
    _fake_distribution(tmp_path, "misspelled = misspelled_plugin\n")


def test_a_misspelled_hook_of_an_entry_point_plugin_is_reported_and_skipped(tmp_path, monkeypatch):
    _misspelled_distribution(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    manager = PluginManager()
    with pytest.warns(UserWarning, match="tt plugin 'misspelled'.*skipped.*'create_layr'.*'create_layer'"):
        manager.load_entry_points(strict=False)
    assert [name for name, _ in manager.failures] == ["misspelled"]
    assert manager.get_plugin("misspelled") is None
    assert "trainable_tokens" in manager.methods
    manager.check_pending()  # nothing unknown is left registered


def test_strict_mode_turns_a_misspelled_hook_into_a_plugin_error(tmp_path, monkeypatch):
    _misspelled_distribution(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(tt_core.PluginError, match="tt plugin 'misspelled'.*'create_layr'"):
        PluginManager().load_entry_points(strict=True)


def test_the_method_table_is_built_once_until_a_plugin_comes_or_goes(monkeypatch):
    manager = PluginManager()
    manager.load_entry_points()
    calls = []
    list_distinfo = manager.list_plugin_distinfo
    monkeypatch.setattr(manager, "list_plugin_distinfo", lambda: calls.append(1) or list_distinfo())
    first = manager.methods
    assert first["trainable_tokens"].distribution == "tt-adapters"
    for _ in range(5):
        assert manager.methods == first
        manager.method_for(first["trainable_tokens"].config_class(token_indices=[1]))
    assert len(calls) == 1
    manager.register(EchoPlugin(), name="echo")
    assert manager.methods["echo"].distribution is None and len(calls) == 2
    manager.unregister(name="echo")
    assert "echo" not in manager.methods and len(calls) == 3


def test_one_plugin_surface():
    from tt_core import defaults, plugins
    from tt_core.api import hookspecs

    assert tt_core.hookimpl is hookspecs.hookimpl is defaults.hookimpl
    assert tt_core.MethodRegister is plugins.MethodRegister
    assert {"hookimpl", "MethodRegister"} <= set(tt_core.__all__)
