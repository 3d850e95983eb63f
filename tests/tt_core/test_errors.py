"""Every error raised on purpose is a TTError of the right kind, and still the built-in it was before."""

import pytest
from models import build

import tt_core
from tt_core import AdapterModel, get_adapter_model
from tt_core.api.errors import ArgumentTypeError, ConfigError, SavedFolderError, TTError
from tt_plugins.lora_embedding import LoraEmbeddingConfig
from tt_plugins.trainable_tokens import TrainableTokensConfig


def test_every_class_is_exported_and_keeps_its_builtin_base():
    for name, builtin in [
        ("ConfigError", ValueError),
        ("ArgumentTypeError", TypeError),
        ("AdapterStateError", ValueError),
        ("PluginError", RuntimeError),
        ("SavedFolderError", ValueError),
        ("MissingFiles", ValueError),
        ("RegistryError", ValueError),
        ("StorageError", OSError),
    ]:
        error_class = getattr(tt_core, name)
        assert issubclass(error_class, TTError) and issubclass(error_class, builtin), name


@pytest.mark.parametrize(
    ("make", "kind"),
    [
        (lambda: TrainableTokensConfig(token_indices=[]), ConfigError),
        (lambda: TrainableTokensConfig(token_indices=[-1]), ConfigError),
        (lambda: LoraEmbeddingConfig(r=0), ConfigError),
        (lambda: get_adapter_model(build("llama"), TrainableTokensConfig(token_indices=[9999])), ConfigError),
        (
            lambda: get_adapter_model(
                build("llama"), TrainableTokensConfig(token_indices=[1], target_modules=["nowhere"])
            ),
            ConfigError,
        ),
        (lambda: TrainableTokensConfig.from_tokens(["a"], object(), token_indices=[1]), ArgumentTypeError),
    ],
)
def test_bad_configs_raise_config_errors(make, kind):
    with pytest.raises(kind):
        make()


def test_a_corrupt_or_foreign_folder_raises_saved_folder_error(tmp_path):
    adapter_model = get_adapter_model(build("llama"), TrainableTokensConfig(token_indices=[1, 2]))
    adapter_model.save_pretrained(tmp_path / "saved")
    (tmp_path / "saved" / "manifest.json").write_text("{not json")
    with pytest.raises(SavedFolderError, match="manifest.json: is not valid JSON"):
        AdapterModel.from_pretrained(build("llama"), tmp_path / "saved")

    peft_folder = tmp_path / "peft"
    peft_folder.mkdir()
    (peft_folder / "adapter_config.json").write_text('{"peft_type": "LORA"}')
    (peft_folder / "adapter_model.bin").write_bytes(b"pickle")
    with pytest.raises(SavedFolderError, match="a pickle, which tt-adapters never loads"):
        AdapterModel.from_pretrained(build("llama"), peft_folder)
