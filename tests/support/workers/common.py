"""What the worker scripts and the tests that drive them share: models without transformers.

Worker scripts import this as ``common`` (their own folder is on sys.path);
tests import it as ``workers.common`` (conftest puts tests/support on sys.path).
"""

from __future__ import annotations

import torch
from torch import nn

from tt_core import AdapterModel, get_adapter_model
from tt_plugins.trainable_tokens import TrainableTokensConfig

# The big adapter of the kill test: 20,000 rows x 1,024 floats = 80 MB of weights.
BIG_VOCAB, BIG_WIDTH, BIG_FIRST = 20_100, 1024, 100
# The small adapters of the concurrency tests.
SMALL_VOCAB, SMALL_WIDTH, SMALL_FIRST = 64, 8, 40


class EmbeddingModel(nn.Module):
    """An embedding and nothing else: ``forward(ids)`` returns the embedded rows."""

    def __init__(self, vocab: int, width: int) -> None:
        super().__init__()
        # Deterministic and cheap (no random init): row i holds -i, a value no adapter here fills in.
        weight = -torch.arange(vocab, dtype=torch.float32).unsqueeze(1).expand(vocab, width).contiguous()
        self.emb = nn.Embedding(vocab, width, _weight=weight)

    def get_input_embeddings(self) -> nn.Module:
        return self.emb

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.emb(input_ids)


def big_base() -> EmbeddingModel:
    return EmbeddingModel(BIG_VOCAB, BIG_WIDTH).eval()


def small_base() -> EmbeddingModel:
    return EmbeddingModel(SMALL_VOCAB, SMALL_WIDTH).eval()


def adapted(base: EmbeddingModel, name: str) -> AdapterModel:
    """``base`` with one trainable-tokens adapter ``name`` on every id from the first adapted one."""
    first = BIG_FIRST if base.emb.num_embeddings == BIG_VOCAB else SMALL_FIRST
    ids = list(range(first, base.emb.num_embeddings))
    return get_adapter_model(base, TrainableTokensConfig(token_indices=ids), adapter_name=name)


def rows(adapter_model: AdapterModel, name: str) -> torch.Tensor:
    return adapter_model.model.emb.adapters[name].trainable_tokens_rows


def fill(adapter_model: AdapterModel, name: str, value: float) -> None:
    """Every row of adapter ``name`` becomes ``value``: the content names the version."""
    with torch.no_grad():
        rows(adapter_model, name).fill_(value)


def value_of(adapter_model: AdapterModel, name: str) -> float:
    """The one value every row of ``name`` holds; AssertionError if the rows disagree (a torn save)."""
    data = rows(adapter_model, name).detach()
    first = float(data.reshape(-1)[0])
    assert bool((data == first).all()), (
        f"adapter {name!r} holds a mix of values: {data.unique().tolist()[:10]}"
    )
    return first
