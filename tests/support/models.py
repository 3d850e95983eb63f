"""Tiny models built from transformers configs (no download), and a hand-made one."""

from __future__ import annotations

from collections.abc import Callable

import torch
import transformers
from torch import nn
from torch.func import functional_call

VOCAB = 128
WIDTH = 16


def llama(tied: bool = False, vocab: int = VOCAB, width: int = WIDTH, intermediate: int = 32) -> nn.Module:
    config = transformers.LlamaConfig(
        vocab_size=vocab,
        hidden_size=width,
        intermediate_size=intermediate,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        tie_word_embeddings=tied,
        pad_token_id=None,
    )
    return transformers.LlamaForCausalLM(config)


def gpt2() -> nn.Module:
    config = transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=WIDTH, n_layer=1, n_head=2, n_positions=64, bos_token_id=0, eos_token_id=0
    )
    return transformers.GPT2LMHeadModel(config)


def opt() -> nn.Module:
    config = transformers.OPTConfig(
        vocab_size=VOCAB,
        hidden_size=WIDTH,
        ffn_dim=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        word_embed_proj_dim=WIDTH,
        max_position_embeddings=64,
        pad_token_id=1,
    )
    return transformers.OPTForCausalLM(config)


def t5() -> nn.Module:
    config = transformers.T5Config(
        vocab_size=VOCAB,
        d_model=WIDTH,
        d_ff=32,
        num_layers=1,
        num_heads=2,
        d_kv=8,
        decoder_start_token_id=0,
        pad_token_id=0,
    )
    return transformers.T5ForConditionalGeneration(config)


def gemma3() -> nn.Module:
    config = transformers.Gemma3TextConfig(
        vocab_size=VOCAB,
        hidden_size=WIDTH,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        pad_token_id=0,
    )
    return transformers.Gemma3ForCausalLM(config)


def bert() -> nn.Module:
    config = transformers.BertConfig(
        vocab_size=VOCAB,
        hidden_size=WIDTH,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=64,
        pad_token_id=0,
    )
    return transformers.BertForMaskedLM(config)


class BiasedTiedLM(nn.Module):
    """A hand-made LM: embedding ``emb`` tied to a head with a bias, no transformers."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, WIDTH)
        self.mix = nn.Linear(WIDTH, WIDTH)
        self.head = nn.Linear(WIDTH, VOCAB, bias=True)
        self.head.weight = self.emb.weight
        nn.init.normal_(self.head.bias)

    def get_input_embeddings(self) -> nn.Module:
        return self.emb

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.mix(self.emb(input_ids))))


# name -> (builder, input embedding's full name, names tied to it)
FAMILIES: dict[str, tuple[Callable[[], nn.Module], str, list[str]]] = {
    "llama": (lambda: llama(False), "model.embed_tokens", []),
    "llama_tied": (lambda: llama(True), "model.embed_tokens", ["lm_head"]),
    "gpt2": (gpt2, "transformer.wte", ["lm_head"]),
    "opt": (opt, "model.decoder.embed_tokens", ["lm_head"]),
    "t5": (t5, "shared", ["encoder.embed_tokens", "decoder.embed_tokens", "lm_head"]),
    "gemma3": (gemma3, "model.embed_tokens", ["lm_head"]),
    "bert": (bert, "bert.embeddings.word_embeddings", ["cls.predictions.decoder"]),
    "custom": (BiasedTiedLM, "emb", ["head"]),
}


def build(family: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = FAMILIES[family][0]()
    model.eval()
    return model


def batch(family: str, token_ids: list[int], seed: int = 1) -> dict[str, torch.Tensor]:
    """Model inputs holding every id of ``token_ids`` among random ones (no padding id)."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(2, VOCAB, (2, 10), generator=generator)
    for position, token in enumerate(token_ids[:10]):
        input_ids[position % 2, position // 2 + 3] = token
    if family == "t5":
        return {"input_ids": input_ids, "decoder_input_ids": input_ids.flip(-1)}
    if family == "custom":
        return {"input_ids": input_ids}
    return {"input_ids": input_ids}


def logits(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    out = model(**inputs)
    return out if isinstance(out, torch.Tensor) else out.logits


def weight_names(family: str) -> list[str]:
    """The names of the input embedding's weight and of every weight tied to it."""
    _, embedding, tied = FAMILIES[family]
    return [f"{name}.weight" for name in [embedding, *tied]]


def adapter_state(adapter_model: nn.Module, family: str, adapter: str = "default") -> nn.Module:
    """The state of ``adapter`` on the family's input embedding."""
    return adapter_model.model.get_submodule(FAMILIES[family][1]).adapters[adapter]


def reference_logits(
    reference: nn.Module, family: str, effective: torch.Tensor, inputs: dict[str, torch.Tensor]
) -> torch.Tensor:
    """The base model's logits with ``effective`` as its embedding weight (and every tied one)."""
    out = functional_call(
        reference,
        {name: effective for name in weight_names(family)},
        args=(),
        kwargs=inputs,
        tie_weights=False,
    )
    return out if isinstance(out, torch.Tensor) else out.logits


def word_tokenizer() -> transformers.PreTrainedTokenizerFast:
    """A word-level tokenizer of VOCAB words ("<pad>", "<unk>", "</s>", "w0", "w1", ...), built offline."""
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers import models as tokenizer_models

    words = ["<pad>", "<unk>", "</s>"] + [f"w{i}" for i in range(VOCAB - 3)]
    backend = Tokenizer(tokenizer_models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>", eos_token="</s>"
    )


def assert_grads_like_reference(name: str, state: nn.Module, tensors: object) -> None:
    """The gradients of one adapter's parameters equal those of its hand-folded reference leaves.

    ``tensors`` are the leaves the reference fold used: the rows for trainable
    tokens, ``(A, B)`` for LoRA on the embedding.
    """
    if hasattr(state, "trainable_tokens_rows"):
        pairs = [(state.trainable_tokens_rows, tensors)]
    else:
        pairs = [(state.lora_embedding_A, tensors[0]), (state.lora_embedding_B, tensors[1])]
    for parameter, leaf in pairs:
        assert leaf.grad.abs().sum() > 0, f"{name}: the reference gives no gradient"
        torch.testing.assert_close(parameter.grad, leaf.grad, atol=1e-6, rtol=1e-4)
