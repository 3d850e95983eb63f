"""Shapes (``v<vocab>-d<width>-<tied|untied>-k<rows>[-b<batch>x<seq>]``), the base model, the input ids."""

from __future__ import annotations

import argparse
import dataclasses
import re

import torch
import transformers
from torch import nn

VOCAB_ALIASES = {"32k": 32_000, "128k": 128_256, "256k": 256_000}
INFERENCE_TOKENS = 32
TOKEN_EVERY = 8  # one position in TOKEN_EVERY holds a trainable token id

# Sized for one thread of a 2-core machine: quick under 2 minutes, full under 10.
QUICK_SHAPES = [
    "v32k-d512-tied-k16",
    "v32k-d512-untied-k16",
    "v128k-d512-tied-k16",
    "v128k-d512-untied-k16",
]
FULL_SHAPES = [
    # vocabulary
    "v32k-d512-tied-k16",
    "v32k-d512-untied-k16",
    "v128k-d512-tied-k16",
    "v128k-d512-untied-k16",
    "v256k-d512-tied-k16",
    "v256k-d512-untied-k16",
    # rows, where they weigh most (smallest vocabulary)
    "v32k-d512-tied-k1024",
    "v32k-d512-untied-k1024",
    # width
    "v32k-d1024-tied-k16",
    "v32k-d2048-tied-k16",
]


@dataclasses.dataclass(frozen=True)
class Shape:
    vocab: int
    width: int
    tied: bool
    rows: int
    batch: int = 4
    seq: int = 128

    @classmethod
    def parse(cls, spec: str) -> Shape:
        match = re.fullmatch(r"v(\w+)-d(\d+)-(tied|untied)-k(\d+)(?:-b(\d+)x(\d+))?", spec.strip())
        if not match:
            raise argparse.ArgumentTypeError(
                f"shape {spec!r} should read v<vocab>-d<width>-<tied|untied>-k<rows>[-b<batch>x<seq>], "
                "e.g. v128k-d1024-tied-k16"
            )
        vocab_text, width, tied, rows, batch, seq = match.groups()
        vocab = VOCAB_ALIASES.get(vocab_text.lower())
        if vocab is None:
            if not vocab_text.isdigit():
                raise argparse.ArgumentTypeError(
                    f"vocabulary {vocab_text!r}: use 32k, 128k, 256k or a number"
                )
            vocab = int(vocab_text)
        shape = cls(vocab, int(width), tied == "tied", int(rows), int(batch or 4), int(seq or 128))
        if shape.rows >= shape.vocab:
            raise argparse.ArgumentTypeError(f"{spec}: k must be smaller than the vocabulary")
        return shape

    @property
    def label(self) -> str:
        vocab = next((alias for alias, size in VOCAB_ALIASES.items() if size == self.vocab), str(self.vocab))
        tie = "tied" if self.tied else "untied"
        return f"v{vocab}-d{self.width}-{tie}-k{self.rows}-b{self.batch}x{self.seq}"

    @property
    def token_indices(self) -> list[int]:
        # New tokens sit at the end of a resized vocabulary.
        return list(range(self.vocab - self.rows, self.vocab))


def build_base_model(
    shape: Shape, seed: int = 0, device: str = "cpu", dtype: torch.dtype = torch.float32
) -> nn.Module:
    """A frozen random 2-layer Llama on ``device``, in ``dtype`` (default fp32). Built on meta,
    then filled in place on the device: transformers' own init takes 9-15 s at 128k x 1024 on 2
    cores; this takes about one second."""
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    config = transformers.LlamaConfig(
        vocab_size=shape.vocab,
        hidden_size=shape.width,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=max(512, shape.seq),
        tie_word_embeddings=shape.tied,
        pad_token_id=None,
    )
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(config)
    model.to_empty(device=device)
    model.tie_weights()  # to_empty gives a tied parameter one new tensor per module
    torch.manual_seed(seed)
    if device != "cpu":
        torch.cuda.manual_seed_all(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("norm.weight"):
                parameter.fill_(1.0)
            else:
                parameter.normal_(0.0, 0.02)
    model.model.rotary_emb = LlamaRotaryEmbedding(config).to(device)  # its buffers were left empty on meta
    if dtype != torch.float32:
        nn.Module.to(model, dtype)  # (PreTrainedModel.to adds quantization checks only)
    model.requires_grad_(False)
    if shape.tied != (model.lm_head.weight is model.get_input_embeddings().weight):
        raise RuntimeError(f"{shape.label}: the model's tie is not what the shape asks for")
    return model


def make_input_ids(shape: Shape, batch: int, seq: int, seed: int) -> torch.Tensor:
    """Random ids with a trainable token at one position in TOKEN_EVERY."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, shape.vocab - shape.rows, (batch, seq), generator=generator)
    flat = ids.view(-1)
    positions = torch.arange(0, flat.numel(), TOKEN_EVERY)
    picks = torch.randint(0, shape.rows, (positions.numel(),), generator=generator)
    flat[positions] = torch.tensor(shape.token_indices)[picks]
    return ids
