"""Registry.load(..., relocate=True): adapters whose new tokens collide on ids, in one model and tokenizer.

Two trainable-tokens adapters are trained on disjoint new tokens added after
the same base vocabulary (so their ids collide), each published with its own
tokenizer. Loaded together with relocation, every sample gets what loading
its adapter alone gives, with the logits read through the id change.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import transformers
from models import VOCAB, build, word_tokenizer
from numerics import assert_same_math
from unchanged import assert_same, untouched

from tt_core import AdapterModel, RegistryError, get_adapter_model
from tt_core.cli import main
from tt_core.registry import Registry
from tt_core.relocation import MovedToken, RelocationWarning, plan
from tt_plugins.lora_embedding import LoraEmbeddingConfig
from tt_plugins.lora_linear import LoraLinearConfig
from tt_plugins.trainable_tokens import TrainableTokensConfig

FAMILY = "llama_tied"
# Both vocabularies start with the same "<ref>" (shared: one string, one id), then collide.
MEDICAL = {"<ref>": "w3", "<covid>": "w10 w11", "<dose>": "w12"}
LEGAL = {"<ref>": "w3", "<tort>": "w20", "<lien>": "w21 w22", "<writ>": "w23"}
CLINIC = {"<icu>": "w30", "<ward>": "w31"}
MEDICAL_TEXT = "w5 <covid> w6 <dose> <ref> w7"
LEGAL_TEXT = "<writ> w5 <tort> <lien> <ref> w9"


def _train(adapter_model: AdapterModel, ids: list[int], seed: int) -> None:
    """A few optimizer steps: next-token loss on random sequences holding ``ids``."""
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randint(3, VOCAB, (4, 8), generator=generator)
    for position, token in enumerate(ids):
        inputs[position % 4, 1 + position // 4] = token
    targets = torch.randint(3, VOCAB, (4, 8), generator=generator)
    parameters = [p for p in adapter_model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(parameters, lr=0.2)
    adapter_model.train()
    for _ in range(3):
        out = adapter_model(input_ids=inputs).logits
        loss = torch.nn.functional.cross_entropy(out.flatten(0, 1), targets.flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    adapter_model.eval()


def _publish_tokens(registry: Registry, name: str, tokens: dict[str, str], seed: int) -> list[int]:
    """Add ``tokens`` to a fresh tokenizer and base, train their rows, publish with that tokenizer."""
    tokenizer, model = word_tokenizer(), build(FAMILY)
    config = TrainableTokensConfig.add_new_tokens(model, tokenizer, tokens)
    adapter_model = get_adapter_model(model, config)
    _train(adapter_model, config.token_indices, seed)
    registry.publish(adapter_model, name, tokenizer=tokenizer)
    return list(config.token_indices)


def _publish_clinic(registry: Registry) -> list[int]:
    """A LoRA on the attention projections with trainable tokens for its own two new tokens."""
    tokenizer, model = word_tokenizer(), build(FAMILY)
    ids = TrainableTokensConfig.add_new_tokens(model, tokenizer, CLINIC).token_indices
    config = LoraLinearConfig(r=2, target_modules=["q_proj", "v_proj"], trainable_token_indices=ids)
    adapter_model = get_adapter_model(model, config)
    _train(adapter_model, ids, seed=7)
    registry.publish(adapter_model, "clinic", tokenizer=tokenizer)
    return list(ids)


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    registry = Registry(tmp_path_factory.mktemp("relocate") / "registry")
    assert _publish_tokens(registry, "medical", MEDICAL, seed=1) == [VOCAB, VOCAB + 1, VOCAB + 2]
    assert _publish_tokens(registry, "legal", LEGAL, seed=2) == [VOCAB, VOCAB + 1, VOCAB + 2, VOCAB + 3]
    assert _publish_clinic(registry) == [VOCAB, VOCAB + 1]
    return registry


def _alone(registry: Registry, spec: str):
    """The adapter loaded on its own, with a fresh tokenizer: the reference."""
    tokenizer = word_tokenizer()
    return registry.load(build(FAMILY), spec, tokenizer=tokenizer), tokenizer


def _relocated(registry: Registry, specs: list[str]):
    tokenizer = word_tokenizer()
    with pytest.warns(RelocationWarning) as caught:
        loaded = registry.load(build(FAMILY), specs, tokenizer=tokenizer, relocate=True)
    (warning,) = [w for w in caught if isinstance(w.message, RelocationWarning)]
    return loaded, tokenizer, warning.message.relocation


def _ids(tokenizer, text: str) -> torch.Tensor:
    return tokenizer(text, return_tensors="pt")["input_ids"]


def _mapping(alone_tokenizer, tokenizer) -> list[int]:
    """For every id of the adapter's own tokenizer, the id its string has in the relocated one."""
    vocabulary = tokenizer.get_vocab()
    by_id = {index: content for content, index in alone_tokenizer.get_vocab().items()}
    return [vocabulary[by_id[index]] for index in range(len(alone_tokenizer))]


def _outputs(model, input_ids: torch.Tensor, **kwargs):
    with torch.no_grad():
        out = model(input_ids=input_ids, output_hidden_states=True, **kwargs)
    return out.hidden_states[0], out.hidden_states[-1], out.logits


def _assert_like_alone(got, alone, columns: list[int]) -> None:
    """Embeddings, last hidden states, and the logits read through the id change, equal the lone load's."""
    (embedded, hidden, logits), (embedded_alone, hidden_alone, logits_alone) = got, alone
    assert torch.equal(embedded, embedded_alone)  # the same rows: copied, not computed
    assert_same_math(hidden, hidden_alone)
    assert_same_math(logits[..., columns], logits_alone)


def test_two_colliding_vocabularies_load_into_one_model_and_tokenizer(registry):
    loaded, tokenizer, relocation = _relocated(registry, ["medical", "legal"])

    # What moved: legal's two tokens on medical's ids, after every id in use; '<writ>' keeps its free id.
    assert [str(token) for token in relocation.moved] == [
        f"token '<tort>': id {VOCAB + 1} -> {VOCAB + 4} (legal@1)",
        f"token '<lien>': id {VOCAB + 2} -> {VOCAB + 5} (legal@1)",
    ]
    assert relocation.moved[0] == MovedToken("<tort>", VOCAB + 1, VOCAB + 4, "legal@1")
    assert relocation.shared == ("<ref>",) and relocation.rows == VOCAB + 6
    assert "relocated 2 token(s)" in str(relocation) and str(relocation.moved[1]) in str(relocation)

    # One tokenizer: the shared token once, every other string at its own id.
    assert len(tokenizer) == VOCAB + 6
    added = {c: i for c, i in tokenizer.get_vocab().items() if i >= VOCAB}
    assert added == {
        "<ref>": VOCAB, "<covid>": VOCAB + 1, "<dose>": VOCAB + 2, "<writ>": VOCAB + 3,
        "<tort>": VOCAB + 4, "<lien>": VOCAB + 5,
    }  # fmt: skip
    # One resize, the tied head still tied.
    model = loaded.model
    assert model.get_input_embeddings().weight.shape[0] == VOCAB + 6
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    # The relocated adapter's config names the new ids; its rows are the published ones, in order.
    assert loaded.adapter_configs["legal"].token_indices == [VOCAB, VOCAB + 4, VOCAB + 5, VOCAB + 3]
    published_legal, _ = _alone(registry, "legal")
    for name in ("medical", "legal"):
        reference = published_legal if name == "legal" else _alone(registry, "medical")[0]
        rows = model.model.embed_tokens.adapters[name].trainable_tokens_rows
        assert torch.equal(rows, reference.model.model.embed_tokens.adapters[name].trainable_tokens_rows)


def test_each_sample_of_a_per_sample_batch_gets_what_its_adapter_alone_gives(registry):
    loaded, tokenizer, _ = _relocated(registry, ["medical", "legal"])
    medical, medical_tokenizer = _alone(registry, "medical")
    legal, legal_tokenizer = _alone(registry, "legal")
    inputs = torch.cat([_ids(tokenizer, MEDICAL_TEXT), _ids(tokenizer, LEGAL_TEXT)])
    # The relocated tokenizer gives the legal text the moved ids; the lone one the published ids.
    legal_map = _mapping(legal_tokenizer, tokenizer)
    legal_ids = _ids(legal_tokenizer, LEGAL_TEXT)
    assert inputs[1].tolist() == [legal_map[i] for i in legal_ids[0].tolist()] != legal_ids[0].tolist()

    got = _outputs(loaded, inputs, adapter_names=["medical", "legal"])
    reference_medical = _outputs(medical, _ids(medical_tokenizer, MEDICAL_TEXT))
    reference_legal = _outputs(legal, legal_ids)
    _assert_like_alone([part[:1] for part in got], reference_medical, _mapping(medical_tokenizer, tokenizer))
    _assert_like_alone([part[1:] for part in got], reference_legal, legal_map)
    # And the adapters really change the outputs: the base model gives other embeddings for these ids.
    base = _outputs(loaded, inputs, adapter_names=["__base__", "__base__"])
    assert not torch.equal(base[0], got[0])


def test_a_stack_gives_each_text_what_its_adapter_alone_gives(registry):
    loaded, tokenizer, _ = _relocated(registry, ["medical", "legal"])
    assert loaded.active_adapters == ["medical", "legal"]
    legal, legal_tokenizer = _alone(registry, "legal")
    # The later adapter wins on the rows both train (the shared '<ref>'); legal's text is legal's alone.
    got = _outputs(loaded, _ids(tokenizer, LEGAL_TEXT))
    alone = _outputs(legal, _ids(legal_tokenizer, LEGAL_TEXT))
    _assert_like_alone(got, alone, _mapping(legal_tokenizer, tokenizer))

    # Medical's text without the shared token: medical's alone, except the columns legal's rows write.
    medical, medical_tokenizer = _alone(registry, "medical")
    text = MEDICAL_TEXT.replace("<ref>", "w8")
    got = _outputs(loaded, _ids(tokenizer, text))
    alone = _outputs(medical, _ids(medical_tokenizer, text))
    assert torch.equal(got[0], alone[0])
    assert_same_math(got[1], alone[1])
    mine = [i for i in range(len(medical_tokenizer)) if i != VOCAB]  # '<ref>': legal's row in the stack
    assert_same_math(got[2][..., mine], alone[2][..., mine])


def test_a_combined_lora_and_tokens_adapter_relocates_its_tokens(registry):
    loaded, tokenizer, relocation = _relocated(registry, ["medical", "clinic"])
    assert [str(token) for token in relocation.moved] == [
        f"token '<icu>': id {VOCAB} -> {VOCAB + 3} (clinic@1)",
        f"token '<ward>': id {VOCAB + 1} -> {VOCAB + 4} (clinic@1)",
    ]
    assert loaded.adapter_configs["clinic"].trainable_token_indices == [VOCAB + 3, VOCAB + 4]
    clinic, clinic_tokenizer = _alone(registry, "clinic")
    text = "w4 <icu> w6 <ward> w8"
    got = _outputs(loaded, _ids(tokenizer, text), adapter_names=["clinic"])
    _assert_like_alone(
        got, _outputs(clinic, _ids(clinic_tokenizer, text)), _mapping(clinic_tokenizer, tokenizer)
    )


def test_without_relocate_the_collision_is_refused_naming_the_fix(registry):
    tokenizer, base = word_tokenizer(), build(FAMILY)
    with pytest.raises(RegistryError, match="legal@1 token '<tort>' at id 129.*pass relocate=True"):
        registry.load(base, ["medical", "legal"], tokenizer=tokenizer)
    assert len(tokenizer) == VOCAB and base.get_input_embeddings().weight.shape[0] == VOCAB


def test_plan_relocation_tells_what_would_move_and_changes_nothing(registry):
    tokenizer, base = word_tokenizer(), build(FAMILY)
    before = untouched(base)
    relocation = registry.plan_relocation(base, ["medical", "legal"], tokenizer)
    assert [token.content for token in relocation.moved] == ["<tort>", "<lien>"]
    assert_same(before, base)
    assert len(tokenizer) == VOCAB
    # A tokenizer holding medical's tokens already: the same plan, and medical's tokens are not added again.
    tokenizer.add_tokens(list(MEDICAL))
    assert registry.plan_relocation(base, ["medical", "legal"], tokenizer).moved == relocation.moved
    assert registry.plan_relocation(base, ["legal", "medical"], word_tokenizer()).moved == (
        MovedToken("<covid>", VOCAB + 1, VOCAB + 4, "medical@1"),
        MovedToken("<dose>", VOCAB + 2, VOCAB + 5, "medical@1"),
    )


def test_adapters_that_do_not_collide_load_with_relocate_without_a_warning(registry):
    tokenizer = word_tokenizer()
    with warnings.catch_warnings():
        warnings.simplefilter("error", RelocationWarning)
        loaded = registry.load(build(FAMILY), ["medical"], tokenizer=tokenizer, relocate=True)
    assert loaded.adapter_configs["medical"].token_indices == [VOCAB, VOCAB + 1, VOCAB + 2]


def _publish_refused(registry: Registry, name: str, kind: str) -> None:
    """An adapter whose change to a token depends on the base row at its id, published with one new token."""
    tokenizer, model = word_tokenizer(), build(FAMILY)
    TrainableTokensConfig.add_new_tokens(model, tokenizer, {"<x>": "w40"})
    if kind == "lora_embedding":
        config = LoraEmbeddingConfig(r=2, init_weights=False)
    else:
        config = LoraLinearConfig(r=2, target_modules=["lm_head"], init_lora_weights=False)
    registry.publish(get_adapter_model(model, config), name, tokenizer=tokenizer)


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("lora_embedding", "LoRA on the embedding adds to the base row at each id"),
        ("lora_linear", r"it puts LoRA on \['lm_head'\], whose outputs are token ids"),
    ],
)
def test_what_cannot_move_exactly_is_refused_and_nothing_changes(registry, kind, message):
    _publish_refused(registry, f"refused-{kind.replace('_', '-')}", kind)
    tokenizer, base = word_tokenizer(), build(FAMILY)
    before, vocabulary = untouched(base), tokenizer.get_vocab()
    spec = f"refused-{kind.replace('_', '-')}@1"
    # Its '<x>' claims id 128, which medical's '<ref>' holds.
    with pytest.raises(RegistryError, match=f"{spec} cannot be relocated.*128 -> 131.*{message}"):
        registry.load(base, ["medical", spec], tokenizer=tokenizer, relocate=True)
    assert_same(before, base)
    assert base.get_input_embeddings().weight.shape[0] == VOCAB
    assert tokenizer.get_vocab() == vocabulary and len(tokenizer) == VOCAB


def test_strings_decide_where_a_token_goes():
    """A string already placed (by the tokenizer or any adapter) is where its rows go; fresh ids only else."""
    recorded = [
        ("x@1", [{"content": "<p>", "id": 3}]),
        ("y@1", [{"content": "<q>", "id": 3}, {"content": "<p>", "id": 4}, {"content": "<own>", "id": 2}]),
        ("z@1", [{"content": "<q>", "id": 4}, {"content": "<r>", "id": 2}]),
    ]
    relocation = plan({"a": 0, "b": 1, "<own>": 2}, 3, recorded)
    assert [str(token) for token in relocation.moved] == [
        "token '<q>': id 3 -> 4 (y@1)",  # z places '<q>' at its free id 4: y's row follows the string
        "token '<p>': id 4 -> 3 (y@1)",  # x holds '<p>' at 3
        "token '<r>': id 2 -> 5 (z@1)",  # the tokenizer's own token holds 2: a fresh id after all in use
    ]
    assert {t["content"]: t["id"] for t in relocation.tokens} == {"<p>": 3, "<own>": 2, "<q>": 4, "<r>": 5}
    assert relocation.shared == ()  # '<own>' was the tokenizer's already; '<p>' is at another id in y


def _files(folder) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_refused_relocation_leaves_a_model_carrying_adapters_and_the_registry_as_they_were(registry):
    existing = get_adapter_model(
        build(FAMILY), TrainableTokensConfig(token_indices=[30]), adapter_name="mine"
    )
    rows = existing.model.model.embed_tokens.adapters["mine"].trainable_tokens_rows.detach().clone()
    tokenizer, published = word_tokenizer(), _files(registry.root)
    with pytest.raises(RegistryError, match="would have 134 tokens but the model's embedding 128 rows"):
        registry.load(existing.model, ["medical", "legal"], into=existing, tokenizer=tokenizer, relocate=True)
    assert existing.adapters == ["mine"] and existing.active_adapters == ["mine"]
    assert torch.equal(existing.model.model.embed_tokens.adapters["mine"].trainable_tokens_rows, rows)
    assert existing.get_input_embeddings().weight.shape[0] == VOCAB and len(tokenizer) == VOCAB
    assert _files(registry.root) == published and registry.verify() == []


def test_relocate_needs_a_tokenizer(registry):
    base = build(FAMILY)
    with pytest.raises(
        RegistryError, match="relocate=True gives tokens new ids in a tokenizer; pass tokenizer="
    ):
        registry.load(base, ["medical", "legal"], relocate=True)
    with pytest.raises(TypeError, match="relocate must be True or False"):
        registry.load(base, "medical", tokenizer=word_tokenizer(), relocate="yes")


def test_an_adapter_of_another_base_is_refused_before_the_tokenizer_changes(registry):
    tokenizer, model = word_tokenizer(), build(FAMILY, seed=3)
    config = TrainableTokensConfig.add_new_tokens(model, tokenizer, {"<q>": "w50"})
    registry.publish(get_adapter_model(model, config), "elsewhere", tokenizer=tokenizer)
    tokenizer, base = word_tokenizer(), build(FAMILY)
    before = untouched(base)
    with pytest.raises(RegistryError, match="elsewhere@1 was trained on another base model.*strict=False"):
        registry.load(base, ["medical", "elsewhere"], tokenizer=tokenizer, relocate=True)
    assert_same(before, base)
    assert len(tokenizer) == VOCAB and "<ref>" not in tokenizer.get_vocab()


def test_without_relocate_an_adapter_of_another_base_is_refused_before_the_tokenizer_changes(registry):
    # A plain load with a tokenizer checked the base only after adding the tokens and resizing.
    tokenizer, model = word_tokenizer(), build(FAMILY, seed=3)
    config = TrainableTokensConfig.add_new_tokens(model, tokenizer, {"<q>": "w50"})
    registry.publish(get_adapter_model(model, config), "foreign", tokenizer=tokenizer)
    tokenizer, base = word_tokenizer(), build(FAMILY)
    before = untouched(base)
    with pytest.raises(RegistryError, match="foreign@1 was trained on another base model.*strict=False"):
        registry.load(base, "foreign", tokenizer=tokenizer)
    assert_same(before, base)
    assert len(tokenizer) == VOCAB and "<q>" not in tokenizer.get_vocab()


# ------------------------------------------------------------------------------- tt merge
def _tt(capsys, *argv):
    """Run ``tt argv...`` in this process: (exit status, stdout, stderr)."""
    capsys.readouterr()
    status = main([str(arg) for arg in argv])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def test_tt_merge_relocate_writes_one_model_and_tokenizer_and_prints_what_moved(capsys, tmp_path, registry):
    base_dir, out = tmp_path / "base", tmp_path / "out"
    build(FAMILY).save_pretrained(base_dir)
    word_tokenizer().save_pretrained(base_dir)
    command = ["merge", base_dir, "medical", "legal@1", "--out", out, "--registry", registry.root]

    status, stdout, err = _tt(capsys, *command)
    assert status == 2 and stdout == "" and err.count("\n") == 1, err
    assert (
        err.startswith("tt merge: medical@1 records token '<covid>' at id 129 and legal@1 token '<tort>'")
        and "pass --relocate to give" in err
    )
    assert not out.exists()

    status, stdout, err = _tt(capsys, *command, "--relocate")
    assert status == 0, err
    lines = stdout.splitlines()
    assert lines[0] == (
        "relocated 2 token(s) whose ids were taken: "
        f"token '<tort>': id {VOCAB + 1} -> {VOCAB + 4} (legal@1); "
        f"token '<lien>': id {VOCAB + 2} -> {VOCAB + 5} (legal@1)"
    )
    assert lines[1].startswith(f"wrote {out}: ") and "6 added token(s)" in lines[1] and len(lines) == 2
    merged = transformers.LlamaForCausalLM.from_pretrained(out, local_files_only=True).eval()
    saved_tokenizer = transformers.AutoTokenizer.from_pretrained(out, local_files_only=True)
    expected, tokenizer, _ = _relocated(registry, ["medical", "legal"])
    assert saved_tokenizer.get_vocab() == tokenizer.get_vocab()
    inputs = torch.cat(
        [_ids(saved_tokenizer, MEDICAL_TEXT.replace("<ref>", "w8")), _ids(saved_tokenizer, LEGAL_TEXT)]
    )
    with torch.no_grad():
        assert_same_math(merged(input_ids=inputs).logits, expected(input_ids=inputs).logits)

    # What cannot move exactly is one line naming the flag, and nothing is written.
    _publish_refused(registry, "embedding-terms", "lora_embedding")
    refused = ["merge", base_dir, "medical", "embedding-terms", "--out", tmp_path / "refused"]
    status, stdout, err = _tt(capsys, *refused, "--registry", registry.root, "--relocate")
    assert status == 2 and stdout == "" and err.count("\n") == 1, err
    assert "embedding-terms@1 cannot be relocated" in err and "without --relocate" in err
    assert not (tmp_path / "refused").exists()

    # Without a tokenizer in the base folder there is nothing to relocate in: one line, before loading.
    bare = tmp_path / "bare"
    build(FAMILY).save_pretrained(bare)
    status, stdout, err = _tt(
        capsys, "merge", bare, "medical", "--out", out, "--force", "--relocate", "--registry", registry.root
    )
    assert status == 2 and stdout == "" and err.count("\n") == 1, err
    assert f"{bare} has no tokenizer files" in err


def test_rows_on_an_untied_head_move_with_their_tokens(tmp_path):
    """Trainable tokens given per module ({embedding: ids, head: ids}) on a model whose head is its own."""
    registry = Registry(tmp_path / "registry")
    for seed, (name, tokens) in enumerate([("medical", MEDICAL), ("legal", LEGAL)]):
        tokenizer, model = word_tokenizer(), build("llama")
        ids = TrainableTokensConfig.add_new_tokens(model, tokenizer, tokens).token_indices
        config = TrainableTokensConfig(
            token_indices={"embed_tokens": ids, "lm_head": ids}, init_weights=False
        )
        torch.manual_seed(seed)
        registry.publish(get_adapter_model(model, config), name, tokenizer=tokenizer)
    tokenizer = word_tokenizer()
    with pytest.warns(RelocationWarning, match=f"'<lien>': id {VOCAB + 2} -> {VOCAB + 5}"):
        loaded = registry.load(build("llama"), ["medical", "legal"], tokenizer=tokenizer, relocate=True)
    moved = [VOCAB, VOCAB + 4, VOCAB + 5, VOCAB + 3]
    assert loaded.adapter_configs["legal"].token_indices == {"embed_tokens": moved, "lm_head": moved}
    model = loaded.model
    assert model.get_output_embeddings().weight.shape[0] == VOCAB + 6
    assert model.get_output_embeddings().weight is not model.get_input_embeddings().weight

    legal_tokenizer = word_tokenizer()
    legal = registry.load(build("llama"), "legal", tokenizer=legal_tokenizer)
    got = _outputs(loaded, _ids(tokenizer, LEGAL_TEXT), adapter_names=["legal"])
    alone = _outputs(legal, _ids(legal_tokenizer, LEGAL_TEXT))
    _assert_like_alone(got, alone, _mapping(legal_tokenizer, tokenizer))
