"""The `tt` console command."""

import shutil
import subprocess

from models import build

from tt_core import get_adapter_model
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
