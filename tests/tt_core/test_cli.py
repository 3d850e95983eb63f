"""The `tt` console command."""

import importlib.metadata
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import types

import pytest
from models import build

from tt_core import Registry, get_adapter_model, plugins
from tt_core.cli import main
from tt_plugins.trainable_tokens import TrainableTokensConfig


def test_tt_plugins_lists_the_installed_methods():
    tt = shutil.which("tt")
    assert tt is not None, "the console script is installed with the package"
    out = subprocess.run([tt, "plugins"], capture_output=True, text=True, check=True).stdout
    assert "trainable_tokens" in out and "TrainableTokensConfig" in out


def test_tt_inspect_lists_and_verifies_saved_adapters(tmp_path, capsys):
    adapter_model = get_adapter_model(build("llama"), TrainableTokensConfig(token_indices=[5, 6]))
    adapter_model.save_pretrained(tmp_path)
    assert main(["inspect", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "* default" in out and "trainable_tokens" in out and "[5, 6]" in out

    weights = next((tmp_path / "default").iterdir()) / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-4])
    assert main(["inspect", str(tmp_path)]) == 2
    assert "does not match the hash" in capsys.readouterr().err


def test_tt_plugins_json_lists_methods_and_failures(capsys, monkeypatch):
    assert main(["plugins", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    by_name = {method["name"]: method for method in listed["methods"]}
    assert by_name["trainable_tokens"]["plugin"] == "trainable_tokens"
    assert by_name["trainable_tokens"]["config"].endswith(".TrainableTokensConfig")
    assert set(by_name["trainable_tokens"]) == {"name", "plugin", "config", "distribution", "version"}
    assert listed["failures"] == []

    real = plugins.get_plugin_manager()
    broken = types.SimpleNamespace(methods=real.methods, failures=[("broken", "ModuleNotFoundError: x")])
    monkeypatch.setattr(plugins, "get_plugin_manager", lambda: broken)
    assert main(["plugins", "--json"]) == 1
    assert json.loads(capsys.readouterr().out)["failures"] == [
        {"plugin": "broken", "error": "ModuleNotFoundError: x"}
    ]
    assert main(["plugins"]) == 1
    assert "FAILED broken: ModuleNotFoundError: x" in capsys.readouterr().out


class _ConflictingPlugins:
    failures: list = []

    @property
    def methods(self):
        raise ValueError("adapter method 'x' is provided by both plugin 'a' and 'b'; uninstall one")


@pytest.mark.parametrize("argv", [["plugins"], ["plugins", "--json"]])
def test_tt_plugins_reports_a_plugin_conflict_on_one_line(capsys, monkeypatch, argv):
    monkeypatch.setattr(plugins, "get_plugin_manager", lambda: _ConflictingPlugins())
    assert main(argv) == 1
    captured = capsys.readouterr()
    assert captured.out == "" and "Traceback" not in captured.err
    assert captured.err.startswith("tt plugins: ") and captured.err.count("\n") == 1
    assert "provided by both plugin 'a' and 'b'" in captured.err


def test_tt_inspect_errors_are_one_line_with_exit_2(tmp_path, capsys):
    assert main(["inspect", str(tmp_path / "nothing")]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("tt inspect: ") and captured.err.count("\n") == 1


@pytest.mark.parametrize("command", [["inspect"], ["registry", "publish"]])
def test_a_missing_saved_folder_is_worded_the_same_by_every_command(tmp_path, capsys, command):
    missing = tmp_path / "nothing"
    more = ["name", "--registry", str(tmp_path / "r")] if "publish" in command else []
    argv = [*command, str(missing), *more]
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.err == (
        f"tt {' '.join(command)}: {missing} is not a folder; pass the folder save_pretrained() wrote\n"
    )


def test_tt_inspect_json(tmp_path, capsys):
    adapter_model = get_adapter_model(build("llama"), TrainableTokensConfig(token_indices=[5, 6]))
    adapter_model.add_adapter("other", TrainableTokensConfig(token_indices=[7]))
    adapter_model.save_pretrained(tmp_path)
    assert main(["inspect", "--json", str(tmp_path)]) == 0
    found = json.loads(capsys.readouterr().out)
    assert found["path"] == str(tmp_path) and found["active"] == ["default"]
    by_name = {adapter["name"]: adapter for adapter in found["adapters"]}
    assert set(by_name) == {"default", "other"}
    assert by_name["default"]["active"] is True and by_name["other"]["active"] is False
    assert by_name["other"]["method"] == "trainable_tokens"
    assert by_name["other"]["config"]["token_indices"] == [7]


def test_tt_version(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out == f"tt-adapters {importlib.metadata.version('tt-adapters')}\n"


def _default_sigint() -> None:
    """In the child before it runs: Ctrl-C as a terminal gives it, whatever the caller ignores.

    A shell's background job (`... &`) starts with SIGINT ignored, and tt rightly leaves an ignored
    SIGINT ignored; these tests are about tt handling the signal, so they start it with the default.
    """
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _torch_is_loading(pid: int) -> bool:
    with open(f"/proc/{pid}/maps") as maps:
        return "libtorch" in maps.read()


@pytest.mark.skipif(not hasattr(signal, "SIGINT") or not os.path.isdir("/proc"), reason="needs Linux")
@pytest.mark.parametrize(
    ("argv", "moment"),
    [
        (["plugins"], "torch loading"),  # the import of torch, before any command code runs
        (["plugins"], 0.5),
        (["plugins"], "output"),  # as soon as the result is printed
        (["registry", "--registry", "{tmp}", "list"], 0.2),
        (["registry", "--registry", "{tmp}", "list"], 1.0),
        (["merge", "{tmp}/base", "greet", "--out", "{tmp}/out", "--registry", "{tmp}"], "torch loading"),
        (["merge", "{tmp}/base", "greet", "--out", "{tmp}/out", "--registry", "{tmp}"], 1.5),
    ],
)
def test_ctrl_c_at_any_moment_is_one_line_and_exit_130(tmp_path, argv, moment):
    tt = shutil.which("tt")
    assert tt is not None
    if "merge" in argv:
        build("llama").save_pretrained(tmp_path / "base")
        adapter_model = get_adapter_model(build("llama"), TrainableTokensConfig(token_indices=[5, 6]))
        Registry(tmp_path).publish(adapter_model, "greet")
    argv = [arg.format(tmp=tmp_path) for arg in argv]
    process = subprocess.Popen(
        [tt, *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=_default_sigint
    )
    try:
        if moment == "output":
            assert process.stdout is not None
            process.stdout.readline()
        else:
            # Timed moments count from when torch starts loading: before that a loaded machine may
            # still be starting the interpreter, whose first milliseconds no program can guard.
            deadline = time.monotonic() + 60
            while process.poll() is None and not _torch_is_loading(process.pid):
                assert time.monotonic() < deadline
                time.sleep(0.002)
            if moment != "torch loading":
                time.sleep(moment)
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=60)
    finally:
        process.kill()
    command = " ".join(["tt", *(arg for arg in argv if arg in ("plugins", "registry", "list", "merge"))])
    if process.returncode == 0 and moment != "torch loading":
        assert err == ""  # it had finished and exited before the signal came
        return
    assert (process.returncode, err) == (130, f"{command}: interrupted\n"), out


def test_an_interrupt_python_drops_still_ends_tt_with_its_line_and_130():
    """Ctrl-C landing where Python cannot raise it (a __del__, an import lock's callback) is dropped there
    with an "Exception ignored" report, and the command runs on: tt must still say it was interrupted."""
    script = (
        "import sys; sys.argv = ['tt', 'plugins']\n"
        "import tt_core.cli as cli\n"
        "class Collected:\n"
        "    def __del__(self):\n"
        "        cli._interrupt_once(2, None)  # the handler, run where its exception cannot propagate\n"
        "def work(words, prog):\n"
        "    Collected()\n"
        "    print('the result')\n"
        "    return 0\n"
        "cli._main = work\n"
        "cli._program()\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, preexec_fn=_default_sigint
    )
    assert (done.returncode, done.stderr) == (130, "tt plugins: interrupted\n")


@pytest.mark.parametrize("argv", [["plugins"], ["registry", "list"]])
def test_a_reader_that_stops_reading_ends_tt_quietly_with_141(argv, tmp_path):
    # `tt registry list | head -0` printed "[Errno 32] Broken pipe" and exited 1.
    if argv[0] == "registry":
        argv = [*argv, "--registry", str(tmp_path / "registry")]
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before tt starts: whatever it writes meets no reader
    process = subprocess.Popen(
        [sys.executable, "-m", "tt_core.cli", *argv], stdout=write_end, stderr=subprocess.PIPE
    )
    os.close(write_end)
    assert process.stderr is not None
    err = process.stderr.read().decode()
    assert process.wait(timeout=120) == 141
    assert err == ""
