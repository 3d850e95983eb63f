"""tt_core.registry.Registry as a user sees it, in one process.

Publishing, versions, loading stacks, removing, verifying; the tokens a
tokenizer gained; and adapters shipped in an installed package. Processes
racing on one registry are in test_crash_and_race.py.
"""

from __future__ import annotations

import base64
import hashlib
import importlib
import importlib.metadata
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from models import VOCAB, batch, build, logits, word_tokenizer
from numerics import assert_same_math
from unchanged import assert_same, untouched

from tt_core import AdapterModel, RegistryError, get_adapter_model
from tt_core.registry import Registry
from tt_plugins.lora_embedding import LoraEmbeddingConfig
from tt_plugins.trainable_tokens import TrainableTokensConfig

FAMILY = "llama_tied"
TOKENS = [10, 11, 12]


def _randomize(adapter_model: AdapterModel, seed: int) -> None:
    """Give every adapter weight random values, so each adapter changes the outputs."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, parameter in adapter_model.named_parameters():
            if "trainable_tokens_rows" in name or "lora_" in name:
                parameter.normal_()


def trained(name: str = "default", tokens: list[int] = TOKENS, seed: int = 0) -> AdapterModel:
    """A fresh base with one trained trainable-tokens adapter ``name``."""
    adapter_model = get_adapter_model(
        build(FAMILY), TrainableTokensConfig(token_indices=tokens), adapter_name=name
    )
    _randomize(adapter_model, seed)
    return adapter_model


def weights(adapter_model: AdapterModel, name: str) -> torch.Tensor:
    return adapter_model.model.model.embed_tokens.adapters[name].trainable_tokens_rows.detach().clone()


def files_of(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def registry(tmp_path):
    return Registry(tmp_path / "registry")


# ------------------------------------------------------------------------------ versions
def test_versions_count_up_and_the_bare_name_means_the_newest(registry):
    first, second = trained(seed=1), trained(seed=2)
    assert registry.publish(first, "terms", description="first try") == 1
    assert registry.publish(second, "terms") == 2
    assert registry.publish(trained("other"), "glossary") == 1
    assert registry.versions("terms") == [1, 2]
    assert registry.names() == ["glossary", "terms"]

    newest = registry.info("terms")
    assert (newest.name, newest.version, newest.spec) == ("terms", 2, "terms@2")
    assert newest.method == "trainable_tokens" and newest.source == "local"
    assert newest.path == registry.root / "terms" / "2"
    assert registry.info("terms@1").description == "first try"
    assert registry.info("terms@1").published_at.endswith("+00:00")
    assert [(p.name, p.version) for p in registry.list()] == [("glossary", 1), ("terms", 2)]

    assert torch.equal(weights(registry.load(build(FAMILY), "terms"), "terms"), weights(second, "default"))
    assert torch.equal(weights(registry.load(build(FAMILY), "terms@1"), "terms"), weights(first, "default"))
    with pytest.raises(ValueError, match=r"'terms' has no version 3 .*versions: \[1, 2\]"):
        registry.info("terms@3")
    with pytest.raises(ValueError, match="no adapter 'nope' in the registry.*publish it first"):
        registry.info("nope")
    with pytest.raises(ValueError, match="must be a whole number >= 1"):
        registry.info("terms@0")


def test_a_removed_number_is_never_given_out_again(registry):
    for seed in range(3):
        registry.publish(trained(seed=seed), "terms")
    registry.remove("terms@3")
    assert registry.versions("terms") == [1, 2]
    assert registry.info("terms").version == 2
    assert registry.publish(trained(seed=9), "terms") == 4
    registry.remove("terms@1")
    assert registry.versions("terms") == [2, 4]
    with pytest.raises(ValueError, match=r"terms@1 was removed \(versions left: \[2, 4\]\)"):
        registry.load(build(FAMILY), "terms@1")
    with pytest.raises(ValueError, match="say which version of 'terms' to remove, e.g. terms@1"):
        registry.remove("terms")
    with pytest.raises(ValueError, match="'terms' has no version 7"):
        registry.remove("terms@7")
    with pytest.raises(ValueError, match="'terms' has no version 1"):
        registry.remove("terms@1")  # already removed
    registry.remove("terms@2")
    registry.remove("terms@4")
    assert registry.versions("terms") == [] and registry.names() == []
    assert registry.publish(trained(seed=5), "terms") == 5
    assert registry.gc() == []  # removals clean up after themselves


def test_a_published_version_never_changes(registry):
    adapter_model = trained(seed=1)
    assert registry.publish(adapter_model, "terms") == 1
    before = files_of(registry.root / "terms" / "1")
    original = weights(adapter_model, "default")
    _randomize(adapter_model, seed=2)  # train on, publish again: a new number
    assert registry.publish(adapter_model, "terms") == 2
    assert files_of(registry.root / "terms" / "1") == before
    assert files_of(registry.root / "terms" / "2") != before
    assert torch.equal(weights(registry.load(build(FAMILY), "terms@1"), "terms"), original)
    assert torch.equal(
        weights(registry.load(build(FAMILY), "terms@2"), "terms"), weights(adapter_model, "default")
    )


def test_publishing_one_of_several_adapters_needs_its_name(registry):
    adapter_model = trained("first")
    adapter_model.add_adapter("second", TrainableTokensConfig(token_indices=[20]))
    adapter_model.set_adapter(["first", "second"])
    with pytest.raises(
        ValueError, match=r"the model has adapters \['first', 'second'\]; say which to publish"
    ):
        registry.publish(adapter_model, "terms")
    assert not registry.root.exists()  # refused before anything was written
    assert registry.publish(adapter_model, "terms", adapter="second") == 1
    loaded = registry.load(build(FAMILY), "terms")
    assert loaded.adapter_configs["terms"].token_indices == [20]
    with pytest.raises(ValueError, match="unknown adapter"):
        registry.publish(adapter_model, "terms", adapter="third")
    adapter_model.set_adapter("first")  # one active adapter: that one is meant
    assert registry.publish(adapter_model, "terms") == 2
    assert registry.load(build(FAMILY), "terms").adapter_configs["terms"].token_indices == TOKENS


def test_publish_folder_takes_a_saved_adapter(registry, tmp_path):
    adapter_model = trained("mine", seed=3)
    adapter_model.save_pretrained(tmp_path / "saved")
    assert registry.publish_folder(tmp_path / "saved", "terms", description="from disk") == 1
    assert registry.info("terms").description == "from disk"
    assert torch.equal(
        weights(registry.load(build(FAMILY), "terms"), "terms"), weights(adapter_model, "mine")
    )


def test_publish_folder_of_several_adapters_needs_adapter(registry, tmp_path):
    adapter_model = trained("mine", seed=3)
    adapter_model.add_adapter("other", TrainableTokensConfig(token_indices=TOKENS))
    adapter_model.save_pretrained(tmp_path / "saved")
    with pytest.raises(RegistryError, match=r"holds adapters \['mine', 'other'\]; say which .* adapter="):
        registry.publish_folder(tmp_path / "saved", "terms")
    assert registry.names() == []
    assert registry.publish_folder(tmp_path / "saved", "terms", adapter="other") == 1


# ----------------------------------------------------------------------------- loading
def _published_stack(registry):
    """Two adapters that both replace token 11, so their order matters, and a LoRA; published."""
    by_hand = get_adapter_model(
        build(FAMILY), TrainableTokensConfig(token_indices=[10, 11]), adapter_name="a"
    )
    by_hand.add_adapter("b", TrainableTokensConfig(token_indices=[11, 12]))
    by_hand.add_adapter("c", LoraEmbeddingConfig(r=2, init_weights=False))
    _randomize(by_hand, seed=4)
    for name in ("a", "b", "c"):
        registry.publish(by_hand, name, adapter=name)
    return by_hand


def test_loading_several_specs_stacks_them_in_order(registry):
    by_hand = _published_stack(registry)
    inputs = batch(FAMILY, [10, 11, 12])
    for order in (["a", "b", "c"], ["b", "a"], ["c", "b"]):
        loaded = registry.load(build(FAMILY), order)
        assert loaded.adapters == order and loaded.active_adapters == order
        assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
        by_hand.set_adapter(order)
        assert_same_math(logits(loaded, inputs), logits(by_hand, inputs))
    a_b = logits(registry.load(build(FAMILY), ["a", "b"]), inputs)
    b_a = logits(registry.load(build(FAMILY), ["b", "a"]), inputs)
    assert not torch.allclose(a_b, b_a)  # the order really matters here
    with pytest.raises(ValueError, match="names one adapter twice"):
        registry.load(build(FAMILY), ["a", "a@1"])


def test_is_trainable_loads_adapters_ready_to_train(registry):
    _published_stack(registry)
    loaded = registry.load(build(FAMILY), ["a", "b"], is_trainable=True)
    trainable = sorted(name for name, p in loaded.named_parameters() if p.requires_grad)
    assert trainable == [
        "model.model.embed_tokens.adapters.a.trainable_tokens_rows",
        "model.model.embed_tokens.adapters.b.trainable_tokens_rows",
    ]


def test_loading_into_a_model_adds_the_adapters_inactive(registry):
    by_hand = _published_stack(registry)
    existing = get_adapter_model(
        build(FAMILY), TrainableTokensConfig(token_indices=[30]), adapter_name="mine"
    )
    inputs = batch(FAMILY, [10, 11, 12, 30])
    before = logits(existing, inputs)
    assert registry.load(existing.model, ["b", "a"], into=existing) is existing
    assert existing.adapters == ["mine", "b", "a"] and existing.active_adapters == ["mine"]
    torch.testing.assert_close(logits(existing, inputs), before, rtol=0, atol=0)
    existing.set_adapter(["b", "a"])
    by_hand.set_adapter(["b", "a"])
    assert_same_math(logits(existing, inputs), logits(by_hand, inputs))


def _assert_load_fails_cleanly(registry, specs, match):
    base = build(FAMILY)
    base.model.norm.weight.requires_grad_(False)  # a base with a mixed requires_grad: given back as it was
    before = untouched(base)
    with pytest.raises(ValueError, match=match):
        registry.load(base, specs)
    assert_same(before, base)

    existing = get_adapter_model(
        build(FAMILY), TrainableTokensConfig(token_indices=[30]), adapter_name="mine"
    )
    rows, state = weights(existing, "mine"), existing.model.state_dict()
    with pytest.raises(ValueError, match=match):
        registry.load(existing.model, specs, into=existing)
    assert existing.adapters == ["mine"] and existing.active_adapters == ["mine"]
    assert torch.equal(weights(existing, "mine"), rows)
    assert existing.model.state_dict().keys() == state.keys()
    assert sorted(n for n, p in existing.named_parameters() if p.requires_grad) == [
        "model.model.embed_tokens.adapters.mine.trainable_tokens_rows"
    ]


def test_a_load_whose_second_spec_is_unknown_changes_nothing(registry):
    _published_stack(registry)
    _assert_load_fails_cleanly(registry, ["a", "nope"], "no adapter 'nope'")
    _assert_load_fails_cleanly(registry, ["a", "b@2"], "'b' has no version 2")


def test_a_load_with_a_damaged_file_changes_nothing(registry):
    _published_stack(registry)
    (weights_file,) = (registry.root / "b" / "1").rglob("adapter_model.safetensors")
    data = bytearray(weights_file.read_bytes())
    data[-1] ^= 0x01
    weights_file.write_bytes(bytes(data))
    _assert_load_fails_cleanly(registry, ["a", "b"], "does not match the hash")


def test_a_load_whose_second_adapter_does_not_fit_the_model_changes_nothing(registry):
    _published_stack(registry)
    other_base = get_adapter_model(build(FAMILY, seed=7), TrainableTokensConfig(token_indices=TOKENS))
    registry.publish(other_base, "foreign")  # trained on another base: refused when strict
    _assert_load_fails_cleanly(registry, ["a", "c", "foreign"], "was trained on another base model")


# ------------------------------------------------------------------------------- verify
def test_verify_reports_a_flipped_byte_and_gc_removes_killed_publishes(registry):
    registry.publish(trained(seed=1), "terms")
    registry.publish(trained(seed=2), "terms")
    registry.publish(trained("other"), "glossary")
    assert registry.verify() == []
    (weights_file,) = (registry.root / "terms" / "1").rglob("adapter_model.safetensors")
    data = bytearray(weights_file.read_bytes())
    data[len(data) // 2] ^= 0x40
    weights_file.write_bytes(bytes(data))
    problems = registry.verify()
    assert len(problems) == 1 and problems[0].startswith("terms@1: ")
    assert "adapter_model.safetensors does not match the hash" in problems[0]

    leftover = registry.root / ".tt-tmp-0123456789abcdef"  # what a publish killed midway leaves
    (leftover / "terms").mkdir(parents=True)
    (leftover / "manifest.json").write_text("{}")
    assert registry.names() == ["glossary", "terms"]
    assert registry.gc() == [leftover]
    assert not leftover.exists() and registry.gc() == []
    assert registry.versions("terms") == [1, 2]


# ----------------------------------------------------------------------------- races
def test_a_version_removed_between_listing_and_reading_says_so(registry, monkeypatch):
    registry.publish(trained(seed=1), "terms")
    registry.publish(trained(seed=2), "terms")
    other = Registry(registry.root)  # another process, say
    original = Registry._describe

    def describe(self, name, version, path, source):
        if source == "local" and version == 2 and path.exists():
            other.remove("terms@2")
        return original(self, name, version, path, source)

    monkeypatch.setattr(Registry, "_describe", describe)
    with pytest.raises(ValueError, match=r"^terms@2 was removed while it was being read$"):
        registry.info("terms@2")


def test_a_version_removed_between_info_and_loading_says_so(registry, monkeypatch):
    registry.publish(trained(seed=1), "terms")
    base = build(FAMILY)
    before = untouched(base)
    original = Registry.info

    def info(self, spec):
        found = original(self, spec)
        Registry(self.root).remove(found.spec)
        return found

    monkeypatch.setattr(Registry, "info", info)
    with pytest.raises(ValueError, match=r"^terms@1 was removed while it was being loaded$"):
        registry.load(base, "terms")
    assert_same(before, base)


# ---------------------------------------------------------------------------- tokenizer
NEW_TOKENS = ["<drug>", "<dose>"]


def _published_with_tokens(registry, name="terms", new_tokens=NEW_TOKENS, seed=5):
    """Add tokens to a tokenizer, resize the model, train their rows, publish with the tokenizer."""
    tokenizer, model = word_tokenizer(), build(FAMILY)
    tokenizer.add_tokens(new_tokens)
    model.resize_token_embeddings(len(tokenizer))
    ids = tokenizer.convert_tokens_to_ids(new_tokens)
    assert ids == list(range(VOCAB, VOCAB + len(new_tokens)))
    adapter_model = get_adapter_model(model, TrainableTokensConfig(token_indices=[5, *ids]))
    _randomize(adapter_model, seed)
    registry.publish(adapter_model, name, tokenizer=tokenizer)
    return adapter_model, ids


def test_load_adds_the_published_tokens_at_their_ids_and_resizes_the_model(registry):
    trained_model, ids = _published_with_tokens(registry)
    recorded = registry.info("terms").added_tokens
    assert [(t["content"], t["id"]) for t in recorded if not t["special"]] == list(
        zip(NEW_TOKENS, ids, strict=True)
    )

    tokenizer, base = word_tokenizer(), build(FAMILY)  # the tokenizer the user has: without the tokens
    loaded = registry.load(base, "terms", tokenizer=tokenizer)
    assert tokenizer.convert_tokens_to_ids(NEW_TOKENS) == ids and len(tokenizer) == VOCAB + 2
    assert base.get_input_embeddings().weight.shape[0] == VOCAB + 2
    text = "w3 <drug> w7 <dose> w9"
    inputs = {"input_ids": tokenizer(text, return_tensors="pt")["input_ids"]}
    assert set(ids) <= set(inputs["input_ids"][0].tolist())
    assert_same_math(logits(loaded, inputs), logits(trained_model, inputs))

    # A tokenizer that has the tokens already, at the same ids, is left as it is.
    again = registry.load(build(FAMILY), "terms", tokenizer=tokenizer)
    assert len(tokenizer) == VOCAB + 2
    assert_same_math(logits(again, inputs), logits(trained_model, inputs))


def _assert_refused_unchanged(registry, specs, tokenizer, match):
    base = build(FAMILY)
    before, vocabulary, size = untouched(base), tokenizer.get_vocab(), len(tokenizer)
    with pytest.raises(ValueError, match=match):
        registry.load(base, specs, tokenizer=tokenizer)
    assert_same(before, base)
    assert base.get_input_embeddings().weight.shape[0] == VOCAB
    assert tokenizer.get_vocab() == vocabulary and len(tokenizer) == size


def test_a_tokenizer_whose_ids_are_taken_is_refused_and_nothing_changes(registry):
    _published_with_tokens(registry)
    taken = word_tokenizer()
    taken.add_tokens(["<other>"])  # sits at the id '<drug>' needs
    _assert_refused_unchanged(
        registry, "terms", taken, r"needs tokens \['<drug>', '<dose>'\] at ids \[128, 129\].*has 129 tokens"
    )
    swapped = word_tokenizer()
    swapped.add_tokens(["<dose>", "<drug>"])
    _assert_refused_unchanged(
        registry, "terms", swapped, "token '<drug>' has id 129 in this tokenizer but 128"
    )


def test_two_adapters_wanting_one_id_for_different_tokens_change_nothing(registry):
    _published_with_tokens(registry, "terms")
    _published_with_tokens(registry, "rival", new_tokens=["<rival>"])  # also wants id 128
    _assert_refused_unchanged(
        registry,
        ["terms", "rival"],
        word_tokenizer(),
        "terms@1 records token '<drug>' at id 128 and rival@1 token '<rival>' at id 128: they were "
        "published with different tokenizers",
    )


def test_tokens_for_a_model_that_already_carries_adapters_are_refused_before_any_change(registry):
    _published_with_tokens(registry)
    existing = get_adapter_model(
        build(FAMILY), TrainableTokensConfig(token_indices=[30]), adapter_name="mine"
    )
    tokenizer = word_tokenizer()
    with pytest.raises(
        ValueError, match="would have 130 tokens but the model's embedding 128 rows.*cannot be resized"
    ):
        registry.load(existing.model, "terms", into=existing, tokenizer=tokenizer)
    assert len(tokenizer) == VOCAB and "<drug>" not in tokenizer.get_vocab()
    assert existing.adapters == ["mine"] and existing.get_input_embeddings().weight.shape[0] == VOCAB


# ----------------------------------------------------------------------------- packages
def _record_line(name: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{name},sha256={digest},{len(data)}"


def _wheel(tmp_path: Path, saved: Path) -> Path:
    """A wheel of ``my-adapters 0.1``: a module exposing the folder ``saved`` as three entry points."""
    files = {
        "my_adapters/__init__.py": (
            b"from pathlib import Path\n"
            b"ADAPTER = Path(__file__).parent / 'medical_terms'\n"
            b"def adapter_path():\n"
            b"    return ADAPTER\n"
        )
    }
    for path in sorted(saved.rglob("*")):
        if path.is_file() and not path.name.startswith("."):
            files[f"my_adapters/medical_terms/{path.relative_to(saved).as_posix()}"] = path.read_bytes()
    info = "my_adapters-0.1.dist-info"
    files[f"{info}/METADATA"] = b"Metadata-Version: 2.1\nName: my-adapters\nVersion: 0.1\n"
    files[f"{info}/WHEEL"] = (
        b"Wheel-Version: 1.0\nGenerator: by-hand\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
    )
    files[f"{info}/entry_points.txt"] = (
        b"[tt_core.adapters]\n"
        b"medical_terms = my_adapters:ADAPTER\n"
        b"clinical_terms = my_adapters:adapter_path\n"
        b"broken_terms = my_adapters:NOT_THERE\n"
    )
    record = [_record_line(name, data) for name, data in files.items()] + [f"{info}/RECORD,,"]
    files[f"{info}/RECORD"] = ("\n".join(record) + "\n").encode()
    wheel = tmp_path / "my_adapters-0.1-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        for name, data in files.items():
            archive.writestr(name, data)
    return wheel


@pytest.fixture
def installed(tmp_path, monkeypatch):
    """Install the hand-made wheel for real (pip, into a folder put on sys.path); forget it after."""
    adapter_model = trained(seed=6)  # saved under the default name "default", as most packages will
    adapter_model.save_pretrained(tmp_path / "saved")
    target = tmp_path / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--no-deps",
            "--no-index",
            "--disable-pip-version-check",
            "--quiet",
            "--target",
            str(target),
            str(_wheel(tmp_path, tmp_path / "saved")),
        ],
        check=True,
    )
    assert (target / "my_adapters-0.1.dist-info" / "INSTALLER").read_text().strip() == "pip"
    monkeypatch.syspath_prepend(str(target))

    def forget():
        monkeypatch.undo()  # sys.path as before (and importlib's caches invalidated)
        sys.modules.pop("my_adapters", None)
        importlib.invalidate_caches()

    yield adapter_model, forget
    forget()


def test_an_installed_package_provides_read_only_adapters(registry, installed):
    adapter_model, forget = installed
    registry.publish(trained("mine"), "local_terms")
    assert registry.names() == ["broken_terms", "clinical_terms", "local_terms", "medical_terms"]
    info = registry.info("medical_terms")
    assert (info.spec, info.source, info.method) == (
        "medical_terms@1",
        "package my-adapters 0.1",
        "trainable_tokens",
    )
    assert info.path.parent.name == "my_adapters" and info.path.name == "medical_terms"
    assert registry.versions("medical_terms") == [1]
    # A broken entry point is listed as broken (and by verify()), and hides nothing else.
    listed = registry.list()
    assert [p.name for p in listed] == ["broken_terms", "clinical_terms", "local_terms", "medical_terms"]
    assert [p.broken for p in listed] == [True, False, False, False]
    assert "NOT_THERE" in listed[0].problem
    (problem,) = registry.verify()
    assert problem.startswith("broken_terms@1: packaged adapter 'broken_terms' cannot be read")

    for name in ("medical_terms", "clinical_terms"):  # a path, and a callable returning one
        loaded = registry.load(build(FAMILY), name)
        assert loaded.adapters == [name]
        assert torch.equal(weights(loaded, name), weights(adapter_model, "default"))
    stacked = registry.load(build(FAMILY), ["local_terms", "medical_terms@1"])
    assert stacked.active_adapters == ["local_terms", "medical_terms"]

    with pytest.raises(ValueError, match="'medical_terms' is provided read-only by package my-adapters 0.1"):
        registry.publish(trained(), "medical_terms")
    with pytest.raises(ValueError, match="read-only by package my-adapters 0.1; uninstall it instead"):
        registry.remove("medical_terms@1")
    with pytest.raises(ValueError, match="is packaged .* and has only version 1"):
        registry.info("medical_terms@2")
    assert not (registry.root / "medical_terms").exists()

    forget()  # uninstalled: nothing of it stays behind in importlib's caches
    assert "my_adapters" not in sys.modules
    assert "medical_terms" not in importlib.metadata.entry_points(group="tt_core.adapters").names
    assert registry.names() == ["local_terms"]
    with pytest.raises(ValueError, match="no adapter 'medical_terms'"):
        registry.info("medical_terms")
