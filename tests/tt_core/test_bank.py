"""The adapter bank: a per-sample call costs the same ops whatever the number of distinct adapters.

Counted with a dispatch mode (``OpRecorder``): every aten op a per-sample
forward runs, for 2, 8 and 32 distinct adapters in the batch; and none of the
ops that make the host wait for a device value, in a forward or a decode step.
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from host_reads import host_reads
from models import llama
from numerics import assert_same_math

from tt_core import AdapterConfig, AdapterModel
from tt_core.testing import OpRecorder
from tt_plugins.lora_embedding import LoraEmbeddingConfig
from tt_plugins.lora_linear import LoraLinearConfig
from tt_plugins.trainable_tokens import TrainableTokensConfig

VOCAB = 256
SAMPLES = 32


def _served(adapters: int, kind: str) -> tuple[AdapterModel, list]:
    """A tiny Llama with ``adapters`` adapters, and one entry per sample naming every one of them.

    ``kind``: "embedding" mixes trainable tokens and LoRA on a tied embedding
    and head; "linear" makes every trainable-tokens adapter a LoRA on the
    attention's linear layers holding those rows too.
    """
    torch.manual_seed(0)
    adapter_model = AdapterModel(llama(True, vocab=VOCAB))
    names = []
    for index in range(adapters):
        name = f"a{index}"
        ids = sorted({3 + index, 100 + 2 * index, 7, 200 - index % 7})
        config: AdapterConfig
        if index % 2:
            config = LoraEmbeddingConfig(r=1 + index % 5, init_weights=False)
        elif kind == "linear":  # LoRA on q_proj and v_proj, with rows of the embedding (PEFT's option)
            config = LoraLinearConfig(
                r=1 + index % 4,
                target_modules=["q_proj", "v_proj"],
                init_lora_weights=False,
                trainable_token_indices=ids,
            )
        else:
            config = TrainableTokensConfig(token_indices=ids, init_weights=False)
        adapter_model.add_adapter(name, config)
        names.append(name)
    # Every adapter used; stacks two deep on every fourth sample, one sample on the base model.
    entries: list = [names[sample % adapters] for sample in range(SAMPLES)]
    for sample in range(0, SAMPLES, 4):
        entries[sample] = [names[sample % adapters], names[(sample + 1) % adapters]]
    entries[1] = "__base__"
    return adapter_model.eval(), entries


def _input_ids(samples: int = SAMPLES, length: int = 6) -> torch.Tensor:
    generator = torch.Generator().manual_seed(2)
    input_ids = torch.randint(0, VOCAB, (samples, length), generator=generator)
    input_ids[:, 0] = torch.arange(samples) + 3  # touched by one trainable-tokens adapter each
    input_ids[:, -1] = 7  # touched by every trainable-tokens adapter
    return input_ids


def _recorded(adapter_model: AdapterModel, entries: list, input_ids: torch.Tensor) -> list[str]:
    with torch.no_grad():
        adapter_model(input_ids=input_ids, adapter_names=entries)  # fills the adapter tables once
        with OpRecorder() as recorder:
            adapter_model(input_ids=input_ids, adapter_names=entries)
    return recorder.ops


# A head adds the low-rank updates either with each sample's factors gathered (many tokens per
# sample) or with one product over every adapter's factors (a decode step over few adapters);
# which one depends on the shapes and on how many adapters the tables hold, so each regime is
# counted: tables sized as needed with one token per sample (the product over all factors for
# 2, 8 and 32 adapters alike), and tables of fixed capacities with six (the gathered factors).
@pytest.mark.parametrize("kind", ["embedding", "linear"])
@pytest.mark.parametrize(("length", "capacity"), [(1, None), (6, 64)])
def test_a_per_sample_forward_runs_the_same_ops_for_2_8_and_32_distinct_adapters(kind, length, capacity):
    input_ids = _input_ids(length=length)
    counts = {}
    for adapters in (2, 8, 32):
        adapter_model, entries = _served(adapters, kind)
        if capacity:
            adapter_model.prepare_for_compile(max_adapters=capacity, max_rows=8, max_rank=8, max_stack=2)
        counts[adapters] = Counter(_recorded(adapter_model, entries, input_ids))
    assert counts[2] == counts[8] == counts[32]


def test_a_per_sample_forward_and_decode_step_read_no_device_value_on_the_host():
    adapter_model, entries = _served(8, "linear")
    input_ids = _input_ids()
    ops = _recorded(adapter_model, entries, input_ids)
    assert any(op.startswith("aten.searchsorted") for op in ops)  # the bank ran
    assert host_reads(ops) == []
    with torch.no_grad():  # a step of generate: one new token against the cache
        prefix = adapter_model(input_ids=input_ids, adapter_names=entries, use_cache=True)
        cache = {"cache": prefix.cache} if "cache" in prefix else {"past_key_values": prefix.past_key_values}
        step = {"input_ids": prefix.logits[:, -1:].argmax(-1), "use_cache": True, **cache}
        with OpRecorder() as recorder:
            adapter_model(**step, adapter_names=entries)
    assert host_reads(recorder.ops) == []


def test_the_recorder_sees_a_host_read():
    with OpRecorder() as recorder:
        torch.nonzero(torch.tensor([0, 1]))
        torch.tensor([2.0]).item()
    assert host_reads(recorder.ops) == ["aten.nonzero.default", "aten._local_scalar_dense.default"]


@pytest.mark.parametrize(("capacity", "every_factor"), [(None, True), (64, False)])
def test_the_tables_follow_weight_changes_and_equal_each_sample_alone(capacity, every_factor):
    # Both ways of adding the head's low-rank updates (see above): one product with every
    # adapter's factors (tables as needed), each sample's factors gathered (64 adapters' room).
    adapter_model, entries = _served(8, "linear")
    if capacity:
        adapter_model.prepare_for_compile(max_adapters=capacity, max_stack=2)
    input_ids = _input_ids()
    ops = _recorded(adapter_model, entries, input_ids)
    assert ("aten.scatter_add_.default" in ops) == every_factor
    with torch.no_grad():
        for name, parameter in adapter_model.named_parameters():  # an optimizer step, in place
            if ".adapters." in name:
                parameter.add_(torch.randn_like(parameter) * 0.3)
        mixed = adapter_model(input_ids=input_ids, adapter_names=entries).logits
        for sample in (0, 1, 2, 3, 5, 8):
            entry = entries[sample]
            adapter_model.set_adapter([] if entry == "__base__" else entry)
            alone = adapter_model(input_ids=input_ids[sample : sample + 1]).logits[0]
            assert_same_math(mixed[sample], alone)
