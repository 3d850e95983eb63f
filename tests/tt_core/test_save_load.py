"""save_pretrained / from_pretrained / load_adapter, the manifest, and the files on disk."""

import json

import pytest
import torch
from models import batch, build, logits
from safetensors import safe_open

from tt_core import AdapterModel, get_adapter_model
from tt_plugins.trainable_tokens import TrainableTokensConfig

TOKENS = [10, 11, 12]


def snapshot(root, name):
    """The folder holding adapter ``name``'s files, as the manifest names it."""
    return root / json.loads((root / "manifest.json").read_text())["adapters"][name]["path"]


def _trained(family="llama_tied", seed=0):
    model = build(family)
    adapter_model = get_adapter_model(
        model, TrainableTokensConfig(token_indices=TOKENS), adapter_name="tokens"
    )
    adapter_model.add_adapter("other", TrainableTokensConfig(token_indices=[20], init_weights=False))
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, parameter in adapter_model.named_parameters():
            if "trainable_tokens_rows" in name:
                parameter.normal_()
    adapter_model.set_adapter(["tokens", "other"])
    return adapter_model


def test_save_writes_a_manifest_and_one_folder_per_adapter_with_only_the_rows(tmp_path):
    adapter_model = _trained()
    adapter_model.save_pretrained(tmp_path)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["format_version"] == 2
    assert manifest["active"] == ["tokens", "other"]
    assert manifest["adapters"]["tokens"]["method"] == "trainable_tokens"
    assert manifest["adapters"]["tokens"]["plugin"] == "trainable_tokens"
    for name, rows in [("tokens", 3), ("other", 1)]:
        folder = snapshot(tmp_path, name)
        assert folder.parent == tmp_path / name
        assert sorted(p.name for p in folder.iterdir()) == [
            "adapter_config.json",
            "adapter_manifest.json",
            "adapter_model.safetensors",
        ]
        config = json.loads((folder / "adapter_config.json").read_text())
        assert config["method"] == "trainable_tokens"
        with safe_open(str(folder / "adapter_model.safetensors"), "pt") as handle:
            # The tied head shares the rows: they are stored once.
            assert list(handle.keys()) == ["model.embed_tokens.trainable_tokens_rows"]
            assert handle.get_tensor("model.embed_tokens.trainable_tokens_rows").shape == (rows, 16)
        size = (folder / "adapter_model.safetensors").stat().st_size
        assert size < rows * 16 * 4 + 400


@pytest.mark.parametrize("family", ["llama_tied", "t5", "gemma3", "custom"])
def test_from_pretrained_restores_every_adapter_and_the_stack_exactly(tmp_path, family):
    adapter_model = _trained(family) if family == "llama_tied" else None
    if adapter_model is None:
        model = build(family)
        adapter_model = get_adapter_model(
            model, TrainableTokensConfig(token_indices=TOKENS, init_weights=False)
        )
    inputs = batch(family, TOKENS)
    adapter_model.eval()  # as from_pretrained returns it: compare like with like, to the bit
    with torch.no_grad():
        expected = logits(adapter_model, inputs)
    adapter_model.save_pretrained(tmp_path)

    loaded = AdapterModel.from_pretrained(build(family), tmp_path)
    assert loaded.adapters == adapter_model.adapters
    assert loaded.active_adapters == adapter_model.active_adapters
    assert loaded.get_nb_trainable_parameters()[0] == 0
    with torch.no_grad():
        assert torch.equal(logits(loaded, inputs), expected)


def test_from_pretrained_one_adapter_by_name_and_trainable(tmp_path):
    adapter_model = _trained()
    adapter_model.save_pretrained(tmp_path)
    loaded = AdapterModel.from_pretrained(
        build("llama_tied"), tmp_path, adapter_name="other", is_trainable=True
    )
    assert loaded.adapters == ["other"] and loaded.active_adapters == ["other"]
    assert loaded.get_nb_trainable_parameters()[0] == 16


def test_load_adapter_adds_a_saved_adapter_under_a_new_name(tmp_path):
    adapter_model = _trained()
    adapter_model.save_pretrained(tmp_path, selected_adapters=["tokens"])
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == [
        "manifest.json",
        "tokens",
    ]
    target = get_adapter_model(build("llama_tied"), TrainableTokensConfig(token_indices=[30]))
    target.load_adapter(tmp_path, "copied")  # the folder's only adapter, under a new name
    target.load_adapter(snapshot(tmp_path, "tokens"), "again")  # an adapter's own folder directly
    original = adapter_model.model.model.embed_tokens.adapters["tokens"].trainable_tokens_rows
    for name in ["copied", "again"]:
        loaded = target.model.model.embed_tokens.adapters[name].trainable_tokens_rows
        assert torch.equal(loaded, original) and not loaded.requires_grad
    assert target.active_adapters == ["default"]


def test_saving_more_adapters_into_the_same_folder_keeps_the_earlier_ones(tmp_path):
    adapter_model = _trained()
    adapter_model.save_pretrained(tmp_path, selected_adapters=["tokens"])
    adapter_model.save_pretrained(tmp_path, selected_adapters=["other"])
    assert sorted(json.loads((tmp_path / "manifest.json").read_text())["adapters"]) == ["other", "tokens"]


def test_loading_onto_a_model_of_another_vocabulary_is_refused_untouched(tmp_path):
    _trained().save_pretrained(tmp_path)
    bigger = build("llama_tied")
    bigger.resize_token_embeddings(160)
    weights = [p.detach().clone() for p in bigger.parameters()]
    with pytest.raises(ValueError, match=r"saved for model.embed_tokens of shape \(128, 16\).*\(160, 16\)"):
        AdapterModel.from_pretrained(bigger, tmp_path)
    assert all(torch.equal(a, b) for a, b in zip(weights, bigger.parameters(), strict=True))
    assert all(p.requires_grad for p in bigger.parameters())
    assert type(bigger.model.embed_tokens).__name__ == "Embedding"


def test_a_damaged_file_is_detected_by_its_hash(tmp_path):
    _trained().save_pretrained(tmp_path)
    weights = snapshot(tmp_path, "tokens") / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="does not match the hash"):
        AdapterModel.from_pretrained(build("llama_tied"), tmp_path)


def test_asking_for_a_name_the_folder_does_not_hold(tmp_path):
    _trained().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"holds adapters \['other', 'tokens'\], not 'nope'"):
        AdapterModel.from_pretrained(build("llama_tied"), tmp_path, adapter_name="nope")
    with pytest.raises(ValueError, match="neither manifest.json nor adapter_config.json"):
        AdapterModel.from_pretrained(build("llama_tied"), tmp_path / "missing")


def test_a_manifest_pointing_outside_its_folder_is_refused(tmp_path):
    _trained().save_pretrained(tmp_path / "saved")
    manifest_path = tmp_path / "saved" / "manifest.json"
    document = json.loads(manifest_path.read_text())
    document["adapters"]["tokens"]["path"] = "../elsewhere"
    manifest_path.write_text(json.dumps(document))
    with pytest.raises(ValueError, match="outside its folder"):
        AdapterModel.from_pretrained(build("llama_tied"), tmp_path / "saved", adapter_name="tokens")


def _assert_same_state_dict(ours: dict, theirs: dict) -> None:
    assert list(ours) == list(theirs)
    for key, tensor in ours.items():
        assert torch.equal(tensor, theirs[key]), key


@pytest.mark.parametrize("is_trainable", [False, True])
@pytest.mark.parametrize("frozen", [[], ["other"], ["tokens", "other"]])
def test_the_state_dict_is_the_same_after_a_save_load_round_trip(tmp_path, is_trainable, frozen):
    # As PEFT's own save/load tests compare them: whatever requires_grad says on either side.
    adapter_model = _trained()
    if frozen:
        adapter_model.set_requires_grad(frozen, False)
    adapter_model.save_pretrained(tmp_path)
    loaded = AdapterModel.from_pretrained(build("llama_tied"), tmp_path, is_trainable=is_trainable)
    _assert_same_state_dict(adapter_model.state_dict(), loaded.state_dict())
    loaded.load_state_dict(adapter_model.state_dict())  # and each loads the other's
    adapter_model.load_state_dict(loaded.state_dict())
