"""Damaged, hand-edited and half-written save folders.

Every fault is a plain ValueError naming the file, the key and the fix (never
a raw KeyError, TypeError, JSONDecodeError or SafetensorError); a failed load
leaves the model exactly as it was, and a refused or failed save leaves the
folder exactly as it was.
"""

import hashlib
import json
import os
import shutil
import stat
import warnings

import pytest
import safetensors.torch
import torch
from models import batch, build, logits
from numerics import assert_same_math

from tt_core import AdapterLayer, AdapterModel, get_adapter_model
from tt_core.api.errors import SavedFolderError
from tt_core.cli import main as tt
from tt_core.formats.native import weight_fingerprint
from tt_plugins.lora_embedding import LoraEmbeddingConfig
from tt_plugins.trainable_tokens import TrainableTokensConfig

TOKENS = [10, 11, 12]
CONFIG, WEIGHTS, OWN = "adapter_config.json", "adapter_model.safetensors", "adapter_manifest.json"
ROWS = "model.embed_tokens.trainable_tokens_rows"
SHAPES = json.dumps({"model.embed_tokens": [128, 16]})


# --------------------------------------------------------------------- helpers
def _manifest(root):
    return json.loads((root / "manifest.json").read_text())


def snapshot(root, name="tokens"):
    """The folder holding adapter ``name``'s files, as the manifest names it."""
    return root / _manifest(root)["adapters"][name]["path"]


def _adapter_model(model=None, names=("tokens",), seed=0):
    """Adapters of random rows (set by ``seed``) on ``model`` (default: an untied Llama), all active."""
    adapter_model = AdapterModel(build("llama") if model is None else model)
    torch.manual_seed(seed)
    for name in names:
        adapter_model.add_adapter(name, TrainableTokensConfig(token_indices=TOKENS, init_weights=False))
    adapter_model.set_adapter(list(names))
    return adapter_model


def _rows(adapter_model, name="tokens"):
    return adapter_model.model.model.embed_tokens.adapters[name].trainable_tokens_rows.detach().clone()


@pytest.fixture
def saved(tmp_path):
    """A folder holding one saved adapter, 'tokens'."""
    root = tmp_path / "saved"
    _adapter_model().save_pretrained(root)
    return root


def rewrite(root, filename, data, name="tokens"):
    """Replace one saved file and fix its hash in both manifests, so only validation can catch it."""
    folder = snapshot(root, name)
    (folder / filename).write_bytes(data)
    digest = hashlib.sha256(data).hexdigest()
    document = _manifest(root)
    document["adapters"][name]["files"][filename] = digest
    (root / "manifest.json").write_text(json.dumps(document))
    own = json.loads((folder / OWN).read_text())
    own["files"][filename] = digest
    (folder / OWN).write_text(json.dumps(own))


def _state(model):
    return {name: (p.detach().clone(), p.requires_grad) for name, p in model.named_parameters()}


def assert_untouched(model, before):
    """Same weights, same requires_grad flags, and no adapter wrapper left anywhere."""
    after = _state(model)
    assert after.keys() == before.keys()
    for name, (weight, requires_grad) in before.items():
        assert torch.equal(after[name][0], weight), name
        assert after[name][1] == requires_grad, name
    assert not any(isinstance(module, AdapterLayer) for module in model.modules())
    assert type(model.model.embed_tokens).__name__ == "Embedding"


def refused(call, *fragments):
    """``call()`` must raise a SavedFolderError (a ValueError) whose message holds every fragment."""
    with pytest.raises(ValueError) as info:
        call()
    # JSONDecodeError and UnicodeDecodeError are ValueErrors too: they must not leak.
    assert isinstance(info.value, SavedFolderError), repr(info.value)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, message
    return message


def load_refused(path, *fragments, model=None, **kwargs):
    """``from_pretrained`` refuses ``path`` with those fragments and leaves the model untouched."""
    model = build("llama") if model is None else model
    before = _state(model)
    refused(lambda: AdapterModel.from_pretrained(model, path, **kwargs), *fragments)
    assert_untouched(model, before)


def _tree(root):
    """Every file and folder under ``root``, hidden ones included: relative path -> bytes (None: folder)."""
    return {
        str(path.relative_to(root)): None if path.is_dir() else path.read_bytes()
        for path in sorted(root.rglob("*"))
    }


# ------------------------------------------------- 1. direct loads check hashes
@pytest.mark.parametrize("damage", ["flipped byte", "truncated"])
@pytest.mark.parametrize("way_in", ["snapshot folder", "adapter folder", "saved folder"])
def test_every_way_in_checks_the_hashes(saved, damage, way_in):
    """A damaged weights file is refused however the adapter is reached."""
    weights = snapshot(saved) / WEIGHTS
    data = bytearray(weights.read_bytes())
    if damage == "flipped byte":
        data[-1] ^= 0xFF
    else:
        del data[len(data) // 2 :]
    weights.write_bytes(bytes(data))
    path = {"snapshot folder": snapshot(saved), "adapter folder": saved / "tokens", "saved folder": saved}
    listed_in = OWN if way_in == "snapshot folder" else "manifest.json"
    load_refused(path[way_in], f"{weights} does not match the hash in", listed_in)
    target = _adapter_model(names=("mine",))
    flags = {name: p.requires_grad for name, p in target.named_parameters()}
    refused(lambda: target.load_adapter(path[way_in], "loaded"), "does not match the hash")
    assert target.adapters == ["mine"] and target.active_adapters == ["mine"]
    assert {name: p.requires_grad for name, p in target.named_parameters()} == flags


@pytest.mark.parametrize(
    "change, fragment",
    [
        (lambda entry: "{", f"{OWN}: is not valid JSON"),
        (lambda entry: [entry], f"{OWN}: holds a JSON list, not an object"),
        (
            lambda entry: {k: v for k, v in entry.items() if k != "files"},
            "the entry lacks the key(s) ['files']",
        ),
        (lambda entry: {**entry, "files": {}}, "key the entry.files is {}; it must map each file name"),
        (
            lambda entry: {**entry, "files": {**entry["files"], "../x": "0" * 64}},
            "names '../x', which is not a plain file name",
        ),
    ],
    ids=["invalid JSON", "a list", "no files", "files empty", "files outside"],
)
def test_a_malformed_adapter_manifest_is_refused(saved, change, fragment):
    """The snapshot's own manifest is validated like the root one."""
    own = snapshot(saved) / OWN
    document = change(json.loads(own.read_text()))
    own.write_text(document if isinstance(document, str) else json.dumps(document))
    load_refused(snapshot(saved), str(own), fragment)


# ---------------------------------------------------- 2. malformed manifest.json
def _entry(key, value):
    def change(document):
        document["adapters"]["tokens"][key] = value
        return document

    return change


def _entry_without(key):
    def change(document):
        del document["adapters"]["tokens"][key]
        return document

    return change


def _files(extra):
    def change(document):
        document["adapters"]["tokens"]["files"].update(extra)
        return document

    return change


def _top(key, value):
    def change(document):
        document[key] = value
        return document

    return change


def _top_without(key):
    def change(document):
        del document[key]
        return document

    return change


SHA = "0" * 64
MANIFEST_FAULTS = {
    "entry without path": (_entry_without("path"), "adapters['tokens'] lacks the key(s) ['path']"),
    "entry without files": (_entry_without("files"), "adapters['tokens'] lacks the key(s) ['files']"),
    "entry without method": (_entry_without("method"), "adapters['tokens'] lacks the key(s) ['method']"),
    "entry a string": (_top("adapters", {"tokens": "tokens"}), "adapters['tokens'] is a str, not an object"),
    "files a list": (_entry("files", [CONFIG, WEIGHTS]), "key adapters['tokens'].files is ['adapter_config"),
    "files empty": (_entry("files", {}), "key adapters['tokens'].files is {}; it must map each file name"),
    "files ../x": (_files({"../x": SHA}), "names '../x', which is not a plain file name"),
    "files /abs": (_files({"/abs": SHA}), "names '/abs', which is not a plain file name"),
    "files bad hash": (_files({CONFIG: "beef"}), "files['adapter_config.json'] is 'beef', not a SHA-256"),
    "files without weights": (
        _entry("files", {CONFIG: SHA}),
        "files does not list adapter_model.safetensors",
    ),
    "path an int": (_entry("path", 5), "adapters['tokens'].path\" is 5; it must be a relative folder path"),
    "path ../elsewhere": (
        _entry("path", "../elsewhere"),
        "is '../elsewhere', which points outside its folder",
    ),
    "path absolute": (_entry("path", "/tmp/tokens"), "is '/tmp/tokens', which points outside its folder"),
    "method an int": (
        _entry("method", 3),
        "key adapters['tokens'].method is 3; it must be a non-empty string",
    ),
    "base a string": (
        _entry("base", "llama"),
        "key adapters['tokens'].base is 'llama'; it must be an object",
    ),
    "adapters a list": (
        _top("adapters", ["tokens"]),
        "key 'adapters' is ['tokens']; it must name at least one",
    ),
    "adapters empty": (_top("adapters", {}), "key 'adapters' is {}; it must name at least one saved adapter"),
    "adapters missing": (_top_without("adapters"), "key 'adapters' is None; it must name at least one"),
    "active a string": (
        _top("active", "tokens"),
        "key 'active' is 'tokens'; it must list adapters the manifest",
    ),
    "active unknown": (
        _top("active", ["nope"]),
        "key 'active' is ['nope']; it must list adapters the manifest",
    ),
    "version 0": (_top("format_version", 0), "key 'format_version' is 0; it must be a whole number >= 1"),
    "version -1": (_top("format_version", -1), "key 'format_version' is -1; it must be a whole number >= 1"),
    "version 1.5": (_top("format_version", 1.5), "key 'format_version' is 1.5; it must be a whole number"),
    "version '1'": (_top("format_version", "1"), "key 'format_version' is '1'; it must be a whole number"),
    "version true": (_top("format_version", True), "key 'format_version' is True; it must be a whole number"),
    "version null": (_top("format_version", None), "key 'format_version' is None; it must be a whole number"),
    "version missing": (_top_without("format_version"), "lacks the key 'format_version'"),
    "version 99": (
        _top("format_version", 99),
        "has format version 99; this tt-adapters reads up to 2; upgrade",
    ),
    "invalid JSON": (lambda document: '{"format_version": 2,', "manifest.json: is not valid JSON"),
    "not UTF-8": (lambda document: b"\xff\xfe{}", "manifest.json: is not valid JSON"),
    "a JSON list": (lambda document: [document], "manifest.json: holds a JSON list, not an object"),
}


def _break_manifest(root, change):
    document = change(_manifest(root))
    if isinstance(document, bytes):
        (root / "manifest.json").write_bytes(document)
    else:
        (root / "manifest.json").write_text(document if isinstance(document, str) else json.dumps(document))


@pytest.mark.parametrize("fault", MANIFEST_FAULTS)
def test_a_malformed_manifest_is_refused_naming_the_file_and_key(saved, fault):
    change, fragment = MANIFEST_FAULTS[fault]
    _break_manifest(saved, change)
    load_refused(saved, f"{saved / 'manifest.json'}", fragment)
    load_refused(saved, fragment, adapter_name="tokens")  # the load_adapter way in


def _symlinked_weights(root):
    outside = root.parent / "outside.safetensors"
    shutil.copy(snapshot(root) / WEIGHTS, outside)  # the same bytes: only the link gives it away
    (snapshot(root) / WEIGHTS).unlink()
    (snapshot(root) / WEIGHTS).symlink_to(outside)


def _symlinked_folder(inside):
    def change(root):
        folder = snapshot(root)
        target = (root / "copy") if inside else (root.parent / "elsewhere")
        folder.rename(target)
        folder.symlink_to(target)

    return change


def _symlinked_adapter_folder(root):
    (root / "tokens").rename(root.parent / "elsewhere")
    (root / "tokens").symlink_to(root.parent / "elsewhere")


FOLDER_FAULTS = {
    "weights a symlink to outside": (_symlinked_weights, f"{WEIGHTS} is a symbolic link"),
    "snapshot a symlink to outside": (_symlinked_folder(inside=False), "points outside its folder"),
    "snapshot a symlink inside": (_symlinked_folder(inside=True), "is a symbolic link"),
    "adapter folder a symlink": (_symlinked_adapter_folder, "points outside its folder"),
    "an unlisted file": (
        lambda root: (snapshot(root) / "notes.txt").write_text("hi"),
        "not listed: ['notes.txt']",
    ),
    "a sub-folder": (lambda root: (snapshot(root) / "extra").mkdir(), "extra is not a plain file"),
    "weights missing": (lambda root: (snapshot(root) / WEIGHTS).unlink(), f"missing: ['{WEIGHTS}']"),
    "snapshot missing": (lambda root: shutil.rmtree(snapshot(root)), "is missing; save the adapter again"),
}


@pytest.mark.parametrize("fault", FOLDER_FAULTS)
def test_a_tampered_adapter_folder_is_refused(saved, fault):
    change, fragment = FOLDER_FAULTS[fault]
    change(saved)
    load_refused(saved, fragment)


# ------------------------------------------------- 3. adapter_config.json faults
def _config_with(**changes):
    def change(config):
        return json.dumps({**config, **changes}).encode()

    return change


CONFIG_FAULTS = {
    "a JSON list": (lambda config: b"[]", f"{CONFIG}: holds a JSON list, not an object"),
    "invalid JSON": (lambda config: b'{"method": ', f"{CONFIG}: is not valid JSON"),
    "target_modules 5": (
        _config_with(target_modules=5),
        "key 'target_modules' is 5, which is not a list[str]",
    ),
    "token_indices 'x'": (_config_with(token_indices="x"), "key 'token_indices' is 'x', which is not a"),
    "token_indices empty": (_config_with(token_indices=[]), "token_indices is empty"),
    "init_weights 'yes'": (
        _config_with(init_weights="yes"),
        "key 'init_weights' is 'yes', which is not a bool",
    ),
    "an unknown key": (_config_with(bogus=1), "got unknown keys ['bogus']"),
    "another method": (_config_with(method="lora_embedding"), "key 'method' is 'lora_embedding' but"),
    "no method": (lambda config: json.dumps({"token_indices": TOKENS}).encode(), "key 'method' is None but"),
}


@pytest.mark.parametrize("fault", CONFIG_FAULTS)
def test_a_bad_adapter_config_is_refused_naming_the_file_and_key(saved, fault):
    change, fragment = CONFIG_FAULTS[fault]
    rewrite(saved, CONFIG, change(json.loads((snapshot(saved) / CONFIG).read_text())))
    load_refused(saved, f"{snapshot(saved) / CONFIG}: ", fragment)
    load_refused(snapshot(saved), f"{snapshot(saved) / CONFIG}: ", fragment)


def test_a_config_method_other_than_the_manifests_names_both_files(saved):
    rewrite(saved, CONFIG, json.dumps({"method": "lora_embedding", "token_indices": TOKENS}).encode())
    load_refused(saved, "key 'method' is 'lora_embedding' but", "manifest.json says 'trainable_tokens'")


# --------------------------------------------------------- 4. safetensors faults
def _weights(tensors, shapes=SHAPES):
    return safetensors.torch.save(tensors, metadata=None if shapes is None else {"tt_base_shapes": shapes})


RANDOM = torch.randn(3, 16)
WEIGHT_FAULTS = {
    "garbage": (b"not a safetensors file at all", f"{WEIGHTS} is not a valid safetensors file"),
    "empty": (b"", f"{WEIGHTS} is not a valid safetensors file"),
    "shapes not JSON": (
        _weights({ROWS: RANDOM}, "nope"),
        "metadata key 'tt_base_shapes' is 'nope'; it must map",
    ),
    "shapes [128]": (
        _weights({ROWS: RANDOM}, json.dumps({"model.embed_tokens": [128]})),
        "metadata key 'tt_base_shapes' is '{\"model.embed_tokens\": [128]}'; it must map module names",
    ),
    "shapes a list": (_weights({ROWS: RANDOM}, "[128, 16]"), "metadata key 'tt_base_shapes' is '[128, 16]'"),
    "an int tensor": (
        _weights({ROWS: torch.ones(3, 16, dtype=torch.int64)}),
        f"holds non-float tensors ['{ROWS}']",
    ),
    "an extra tensor": (
        _weights({ROWS: RANDOM, "model.embed_tokens.extra": RANDOM.clone()}),
        "unexpected tensors: ['model.embed_tokens.extra']; missing: []",
    ),
    "a missing tensor": (_weights({"model.embed_tokens.other": RANDOM}), f"missing: ['{ROWS}']"),
    "too many rows": (
        _weights({ROWS: torch.randn(4, 16)}),
        f"wrong shape: ['{ROWS} (4, 16) (expected (3, 16))']",
    ),
    "too narrow": (_weights({ROWS: torch.randn(3, 8)}), f"wrong shape: ['{ROWS} (3, 8) (expected (3, 16))']"),
    "another vocabulary": (
        _weights({ROWS: RANDOM}, json.dumps({"model.embed_tokens": [99, 16]})),
        "saved for model.embed_tokens of shape (99, 16) (vocabulary 99, width 16), but this model's is of",
    ),
    "a module the model lacks": (
        _weights({ROWS: RANDOM}, json.dumps({"model.nope": [128, 16]})),
        "saved for model.nope of shape (128, 16) (vocabulary 128, width 16), but this model's is missing",
    ),
}


@pytest.mark.parametrize("fault", WEIGHT_FAULTS)
def test_a_bad_weights_file_is_refused_clearly(saved, fault):
    data, fragment = WEIGHT_FAULTS[fault]
    rewrite(saved, WEIGHTS, data)
    load_refused(saved, fragment)


# ----------------------------------------------- 5. a failed load changes nothing
@pytest.mark.parametrize("fault", ["too many rows", "an extra tensor"])
def test_a_load_failing_after_the_adapter_was_added_gives_the_model_back(saved, fault):
    """These faults show only once the adapter exists on the model: it must go again, outputs equal."""
    rewrite(saved, WEIGHTS, WEIGHT_FAULTS[fault][0])
    model = build("llama")
    inputs = batch("llama", TOKENS)
    with torch.no_grad():
        expected = logits(model, inputs)
    before = _state(model)
    refused(
        lambda: AdapterModel.from_pretrained(model, saved, is_trainable=True), "adapter_model.safetensors"
    )
    assert_untouched(model, before)
    with torch.no_grad():
        assert torch.equal(logits(model, inputs), expected)
    # load_adapter onto a model that has adapters: those stay as they were.
    target = _adapter_model(names=("mine",))
    rows, flags = _rows(target, "mine"), {n: p.requires_grad for n, p in target.named_parameters()}
    refused(lambda: target.load_adapter(saved, "loaded"), "adapter_model.safetensors")
    assert target.adapters == ["mine"] and target.active_adapters == ["mine"]
    assert list(target.model.model.embed_tokens.adapters) == ["mine"]
    assert torch.equal(_rows(target, "mine"), rows)
    assert {n: p.requires_grad for n, p in target.named_parameters()} == flags


# -------------------------------------------------------- 6. the base fingerprint
def test_an_adapter_from_another_base_is_refused_unless_strict_is_false(saved):
    load_refused(
        saved,
        "adapter 'tokens'",
        "was trained on another base model: the first 10 rows of model.embed_tokens.weight are not the "
        "ones it was trained on",
        "pass strict=False to load it anyway",
        model=build("llama", seed=1),
    )
    with pytest.warns(
        UserWarning, match=r"adapter 'tokens': the first 10 rows .* \(loaded anyway, strict=False\)"
    ):
        loaded = AdapterModel.from_pretrained(build("llama", seed=1), saved, strict=False)
    assert torch.equal(_rows(loaded), _rows(_adapter_model()))


def test_new_tokens_trained_on_a_resized_model_load_onto_a_fresh_resized_copy(tmp_path):
    """Rows added by resize_token_embeddings are random: they are not part of the fingerprint."""
    model = build("llama_tied")
    model.resize_token_embeddings(130)
    adapter_model = get_adapter_model(
        model, TrainableTokensConfig(token_indices=[128, 129], init_weights=False)
    )
    inputs = batch("llama_tied", [128, 129])
    with torch.no_grad():
        expected = logits(adapter_model, inputs)
    adapter_model.save_pretrained(tmp_path)

    fresh = build("llama_tied")
    torch.manual_seed(1)
    fresh.resize_token_embeddings(130)
    assert not torch.equal(fresh.model.embed_tokens.weight[128:], model.model.embed_tokens.weight[128:])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loaded = AdapterModel.from_pretrained(fresh, tmp_path)
    with torch.no_grad():
        assert torch.equal(logits(loaded, inputs), expected)


@pytest.mark.parametrize("family", ["llama", "llama_tied"])
def test_new_tokens_added_while_a_lora_is_merged_load_onto_a_clean_resized_base(tmp_path, family):
    """The fingerprint describes the base without the adapters merged into it (issue 17)."""
    model = build(family)
    model.resize_token_embeddings(130)
    adapter_model = AdapterModel(model)
    adapter_model.add_adapter("style", LoraEmbeddingConfig(r=4, lora_alpha=8, init_weights=False))
    adapter_model.set_adapter("style")
    adapter_model.merge_adapter()
    adapter_model.add_adapter("tokens", TrainableTokensConfig(token_indices=[128, 129], init_weights=False))
    adapter_model.save_pretrained(tmp_path, selected_adapters=["tokens"])

    fresh = build(family)
    torch.manual_seed(1)
    fresh.resize_token_embeddings(130)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loaded = AdapterModel.from_pretrained(fresh, tmp_path)  # strict
    adapter_model.unmerge_adapter()
    adapter_model.set_adapter("tokens")
    inputs = batch(family, [128, 129])
    columns = slice(None) if family == "llama_tied" else slice(0, 128)  # an untied head's new rows are random
    with torch.no_grad():
        expected = logits(adapter_model, inputs)[..., columns]
        torch.testing.assert_close(logits(loaded, inputs)[..., columns], expected)


@pytest.mark.parametrize("family", ["llama", "llama_tied"])
def test_an_adapter_loads_strictly_onto_its_base_while_a_lora_is_merged_into_it(tmp_path, family):
    """The loading side compares the base without the adapters merged into it, as the saving side does."""
    saved = get_adapter_model(build(family), TrainableTokensConfig(token_indices=[5, 9], init_weights=False))
    saved.save_pretrained(tmp_path)
    adapter_model = AdapterModel(build(family))
    adapter_model.add_adapter("style", LoraEmbeddingConfig(r=4, lora_alpha=8, init_weights=False))
    adapter_model.set_adapter("style")
    adapter_model.merge_adapter()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        adapter_model.load_adapter(tmp_path, "default")  # strict
    adapter_model.unmerge_adapter()
    adapter_model.set_adapter("default")
    inputs = batch(family, [5, 9, 3])
    with torch.no_grad():
        assert_same_math(logits(adapter_model, inputs), logits(saved, inputs))


class _Embedding(torch.nn.Module):
    """A wide random embedding: 4,096 fingerprinted rows of 64 floats."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = torch.nn.Embedding(4200, 64)

    def get_input_embeddings(self) -> torch.nn.Module:
        return self.emb

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.emb(input_ids)


def test_the_fingerprint_under_a_merged_lora_is_the_clean_bases_bit_for_bit():
    """Subtracting a merged LoRA again rounds; the fingerprint must not depend on that rounding."""
    clean = weight_fingerprint(_Embedding().emb.weight, torch.tensor([4100]))
    adapter_model = AdapterModel(_Embedding())
    adapter_model.add_adapter("style", LoraEmbeddingConfig(r=8, lora_alpha=64, init_weights=False))
    adapter_model.set_adapter("style")
    adapter_model.merge_adapter()
    adapter_model.add_adapter("tokens", TrainableTokensConfig(token_indices=[4100, 4101], init_weights=False))
    assert adapter_model.adapter_record("tokens").fingerprint["weights"]["emb"] == clean
    # What the fingerprint would be if it were taken by subtracting the update again:
    weight = adapter_model.model.emb.base_layer.weight.detach().clone()
    adapter_model.model.emb.adapters["style"].unmerge_from(weight)
    assert weight_fingerprint(weight, torch.tensor([4100])) != clean


def test_a_base_changed_under_a_merged_lora_is_fingerprinted_as_changed():
    """The rows remembered before the merge describe the base only while it stays the same."""
    adapter_model = AdapterModel(_Embedding())
    adapter_model.add_adapter("style", LoraEmbeddingConfig(r=8, lora_alpha=64, init_weights=False))
    with torch.no_grad():
        adapter_model.model.emb.base_layer.weight[:10] += 0.5  # another base, loaded in place, say
    changed = weight_fingerprint(adapter_model.model.emb.base_layer.weight, torch.tensor([4100]))
    adapter_model.set_adapter("style")
    adapter_model.merge_adapter()
    adapter_model.add_adapter("tokens", TrainableTokensConfig(token_indices=[4100, 4101], init_weights=False))
    recorded = adapter_model.adapter_record("tokens").fingerprint["weights"]["emb"]
    assert recorded["sha256"] != weight_fingerprint(_Embedding().emb.weight, torch.tensor([4100]))["sha256"]
    assert recorded["rows"] == changed["rows"] == 4096


def test_a_float32_save_loads_onto_a_bfloat16_copy_of_its_base(saved):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loaded = AdapterModel.from_pretrained(build("llama").to(torch.bfloat16), saved)
    assert torch.equal(_rows(loaded), _rows(_adapter_model()))
    load_refused(
        saved,
        "trained on another base model",
        "(it was saved from a float32 weight; this one is bfloat16)",
        model=build("llama", seed=1).to(torch.bfloat16),
    )


# --------------------------------------------------------------- 7. tt inspect
@pytest.mark.parametrize("fault", MANIFEST_FAULTS)
def test_tt_inspect_reports_a_malformed_manifest_in_one_line(saved, capsys, fault):
    change, fragment = MANIFEST_FAULTS[fault]
    _break_manifest(saved, change)
    assert tt(["inspect", str(saved)]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith("tt inspect: ") and err.count("\n") == 1, err
    assert "manifest.json" in err and fragment in err and "Traceback" not in err


@pytest.mark.parametrize("fault", ["snapshot a symlink to outside", "an unlisted file", "weights missing"])
def test_tt_inspect_reports_a_tampered_folder_in_one_line(saved, capsys, fault):
    change, fragment = FOLDER_FAULTS[fault]
    change(saved)
    assert tt(["inspect", str(saved)]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("tt inspect: ") and err.count("\n") == 1, err
    assert fragment in err


# -------------------------------------------------------------------- 8. saving
@pytest.mark.parametrize(
    "change, fragment",
    [
        (_top("format_version", 99), "has format version 99; this tt-adapters reads up to 2; upgrade"),
        (lambda document: "{", "manifest.json: is not valid JSON"),
    ],
    ids=["newer format", "damaged manifest"],
)
def test_a_save_into_a_newer_or_damaged_folder_is_refused_untouched(saved, change, fragment):
    _break_manifest(saved, change)
    (saved / ".tt.lock").unlink()  # as in a folder copied from elsewhere: not even a lock file appears
    before = _tree(saved)
    refused(lambda: _adapter_model(names=("tokens", "other"), seed=1).save_pretrained(saved), fragment)
    assert _tree(saved) == before


def _fail_on_second_snapshot(monkeypatch):
    from tt_core.disk import storage

    real, calls = storage.write_snapshot, []

    def write_snapshot(root, adapter, files):
        calls.append(adapter)
        if len(calls) == 2:
            raise OSError(28, "No space left on device (disk full)")
        return real(root, adapter, files)

    monkeypatch.setattr(storage, "write_snapshot", write_snapshot)


def _fail_half_way_through_the_second_weights_file(monkeypatch):
    from tt_core.disk import storage

    real, calls = storage.write_file, []

    def write_file(path, data):
        if path.name == WEIGHTS:
            calls.append(path)
            if len(calls) == 2:
                path.write_bytes(data[: len(data) // 2])
                raise OSError(28, "No space left on device (disk full)")
        return real(path, data)

    monkeypatch.setattr(storage, "write_file", write_file)


def _fail_on_the_manifest_switch(monkeypatch):
    from tt_core.disk import storage

    def replace(source, destination):
        raise OSError(28, "No space left on device (disk full)")

    monkeypatch.setattr(storage.os, "replace", replace)


@pytest.mark.parametrize(
    "inject",
    [_fail_on_second_snapshot, _fail_half_way_through_the_second_weights_file, _fail_on_the_manifest_switch],
    ids=["second snapshot", "second weights file", "manifest switch"],
)
def test_a_save_failing_half_way_leaves_the_earlier_save_as_it_was(saved, monkeypatch, inject):
    before = _tree(saved)
    newer = _adapter_model(names=("tokens", "other"), seed=1)
    with monkeypatch.context() as patch:
        inject(patch)
        with pytest.raises(OSError, match="disk full"):
            newer.save_pretrained(saved)
    assert _tree(saved) == before
    assert not [path for path in saved.rglob("*") if path.name.startswith(".tt-tmp-")]
    loaded = AdapterModel.from_pretrained(build("llama"), saved)
    assert loaded.adapters == ["tokens"]
    assert torch.equal(_rows(loaded), _rows(_adapter_model()))


@pytest.mark.parametrize(
    "umask, file_mode, folder_mode", [(0o022, 0o644, 0o755), (0o002, 0o664, 0o775)], ids=["022", "002"]
)
def test_saved_files_and_folders_honour_the_umask(tmp_path, umask, file_mode, folder_mode):
    root = tmp_path / "saved"
    previous = os.umask(umask)
    try:
        _adapter_model(names=("tokens", "other")).save_pretrained(root)
        _adapter_model(names=("tokens",), seed=1).save_pretrained(root)  # a second save replaces one
    finally:
        os.umask(previous)
    modes = {
        str(p.relative_to(tmp_path)): oct(stat.S_IMODE(p.stat().st_mode)) for p in [root, *root.rglob("*")]
    }
    expected = {
        str(p.relative_to(tmp_path)): oct(folder_mode if p.is_dir() else file_mode)
        for p in [root, *root.rglob("*")]
    }
    assert modes == expected


def test_resaving_removes_the_snapshots_the_manifest_no_longer_names(saved):
    old = snapshot(saved)
    _adapter_model(seed=1).save_pretrained(saved)
    new = snapshot(saved)
    assert new != old and not old.exists()
    assert [p.name for p in (saved / "tokens").iterdir()] == [new.name]
    assert sorted(p.name for p in new.iterdir()) == [CONFIG, OWN, WEIGHTS]


def _format_1(root, source):
    """Rewrite the format-2 save ``source`` as the format-1 folder ``root`` that tt-adapters 0.1 wrote."""
    document, adapters = _manifest(source), {}
    for name, entry in document["adapters"].items():
        (root / name).mkdir(parents=True)
        files = {}
        for filename in (CONFIG, WEIGHTS):
            data = (source / entry["path"] / filename).read_bytes()
            if filename == CONFIG:
                data = data.rstrip(b"\n")  # 0.1 wrote no final newline
            (root / name / filename).write_bytes(data)
            files[filename] = hashlib.sha256(data).hexdigest()
        adapters[name] = {"path": name, "method": entry["method"], "plugin": entry["plugin"], "files": files}
    format_1 = {"format_version": 1, "adapters": adapters, "active": document["active"]}
    (root / "manifest.json").write_text(json.dumps(format_1, indent=2) + "\n")
    return root


@pytest.fixture
def format_1(tmp_path):
    """A format-1 folder holding 'tokens' and 'other' (rows of seed 0)."""
    _adapter_model(names=("tokens", "other")).save_pretrained(tmp_path / "format_2")
    return _format_1(tmp_path / "format_1", tmp_path / "format_2")


def test_a_format_1_folder_loads_as_before(format_1):
    original = _adapter_model(names=("tokens", "other"))
    loaded = AdapterModel.from_pretrained(build("llama"), format_1)
    assert loaded.adapters == ["tokens", "other"] and loaded.active_adapters == ["tokens", "other"]
    target = _adapter_model(names=("mine",), seed=5)
    target.load_adapter(format_1, "tokens")
    target.load_adapter(format_1 / "other", "again")  # one adapter's format-1 folder
    for name in ["tokens", "other"]:
        assert torch.equal(_rows(loaded, name), _rows(original, name))
    assert torch.equal(_rows(target, "tokens"), _rows(original, "tokens"))
    assert torch.equal(_rows(target, "again"), _rows(original, "other"))
    assert tt(["inspect", str(format_1)]) == 0


def test_a_damaged_format_1_folder_is_refused(format_1):
    weights = format_1 / "tokens" / WEIGHTS
    weights.write_bytes(weights.read_bytes()[:-1])
    load_refused(format_1, f"{weights} does not match the hash in {format_1 / 'manifest.json'}")
    load_refused(format_1 / "tokens", "does not match the hash")


def test_saving_into_a_format_1_folder_upgrades_it_and_keeps_the_other_adapters(format_1):
    other_files = {name: (format_1 / "other" / name).read_bytes() for name in (CONFIG, WEIGHTS)}
    _adapter_model(names=("tokens",), seed=1).save_pretrained(format_1)
    document = _manifest(format_1)
    assert document["format_version"] == 2
    assert document["adapters"]["tokens"]["path"] == f"tokens/{snapshot(format_1).name}"
    assert document["adapters"]["other"]["path"] == "other"
    # The replaced format-1 files are gone; the kept adapter's are untouched.
    assert [p.name for p in (format_1 / "tokens").iterdir()] == [snapshot(format_1).name]
    assert {name: (format_1 / "other" / name).read_bytes() for name in (CONFIG, WEIGHTS)} == other_files
    loaded = AdapterModel.from_pretrained(build("llama"), format_1)
    assert torch.equal(_rows(loaded, "tokens"), _rows(_adapter_model(seed=1)))
    assert torch.equal(_rows(loaded, "other"), _rows(_adapter_model(names=("tokens", "other")), "other"))


# ------------------------------------------------- 9. leftovers of a killed save
def test_leftovers_of_a_killed_save_are_ignored_then_removed_by_the_next_save(saved):
    leftover = saved / ".tt-tmp-deadbeef"
    leftover.mkdir()
    (leftover / WEIGHTS).write_bytes(b"\0" * (1 << 20))
    (saved / ".tt-tmp-0123456789abcdef.json").write_text('{"format_version": 2')
    unnamed = saved / "tokens" / "00000000deadbeef"  # renamed into place, never named by the manifest
    unnamed.mkdir()
    (unnamed / WEIGHTS).write_bytes(b"half")

    assert AdapterModel.from_pretrained(build("llama"), saved).adapters == ["tokens"]
    assert tt(["inspect", str(saved)]) == 0
    _adapter_model(seed=1).save_pretrained(saved)
    assert not [path for path in saved.rglob("*") if path.name.startswith(".tt-tmp-")]
    assert not unnamed.exists()
    assert [entry["path"] for entry in _manifest(saved)["adapters"].values()] == [
        f"tokens/{snapshot(saved).name}"
    ]
