"""End to end with the real peft: a combined adapter PEFT trained, served from a registry, stacked, merged.

PEFT trains ``LoraConfig(target_modules=..., trainable_token_indices=[...])``
(LoRA on the projections and new token rows, one PEFT adapter) and saves it;
tt-adapters publishes it to a registry (as one adapter, as PEFT holds it),
loads it onto a fresh base model, stacks a second trainable-tokens adapter on
it, serves a batch whose samples use the combined adapter by its one name, the
stack and the base model, and merges the stack into a plain transformers
model. Each step is checked against the step
before it, and the first against PEFT's own outputs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import peft
import pytest
import torch
from models import VOCAB, build, logits
from numerics import assert_same_math
from torch import nn

from tt_core import AdapterLayer, AdapterModel, Registry
from tt_core.serving import BASE
from tt_plugins.lora_linear import LoraLinearConfig, LoraLinearLayer
from tt_plugins.trainable_tokens import TrainableTokensConfig, TrainableTokensLayer

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

TOKENS = [100, 101, 102]  # the combined adapter's new token rows
EXTRA = [102, 103]  # the second adapter's rows: 102 overlaps, and the later adapter in a stack wins
# PEFT's two ways of naming the projections: a list (untied model) and "all-linear" (tied model).
TARGETS: dict[str, Any] = {
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"],
    "llama_tied": "all-linear",
}
COMBINED = "combined"  # PEFT's one adapter: its LoRA and its rows, under one name
STACK = [COMBINED, "extra"]


def input_ids(rows: int = 4, seed: int = 5) -> torch.Tensor:
    """Random ids in which every sample holds every new token (of both adapters)."""
    ids = torch.randint(2, 90, (rows, 10), generator=torch.Generator().manual_seed(seed))
    for position, token in enumerate(sorted({*TOKENS, *EXTRA})):
        ids[:, 2 * position + 1] = token
    return ids


def peft_trained(family: str, path: Path) -> tuple[nn.Module, Path]:
    """PEFT's combined adapter after a few Adam steps of causal-LM training, saved by PEFT."""
    config = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=TARGETS[family], trainable_token_indices=TOKENS
    )
    peft_model = peft.get_peft_model(build(family), config)
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in trainable]
    optimizer = torch.optim.Adam(trainable, lr=0.05)
    peft_model.train()
    torch.manual_seed(0)
    for step in range(3):
        ids = input_ids(seed=10 + step)
        peft_model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    # Every trainable tensor moved off its initialisation (LoRA's B starts at zero: a no-op).
    assert all(not torch.equal(p, b) for p, b in zip(trainable, before, strict=True))
    peft_model.eval()
    peft_model.save_pretrained(str(path))
    return peft_model, path


def by_hand(family: str, served: AdapterModel) -> nn.Module:
    """The base model with the stack written into its weights by hand: the combined adapter's rows,
    the extra adapter's rows over them, and every LoRA update added to its projection."""
    model = build(family)
    embed = served.model.model.embed_tokens
    with torch.no_grad():
        weight = model.model.embed_tokens.weight  # the head's too when tied
        for name in (COMBINED, "extra"):
            state = embed.adapters[name]
            weight[state.token_indices] = state.trainable_tokens_rows
        if family == "llama":  # an untied head keeps its own rows: PEFT's rows are the embedding's only
            assert not isinstance(served.model.lm_head, AdapterLayer)
        for name, module in served.model.named_modules():
            state = (
                module.adapters[COMBINED]
                if isinstance(module, AdapterLayer) and COMBINED in module.adapters
                else None
            )
            if isinstance(state, LoraLinearLayer):
                model.get_submodule(name).weight += state.scaling * state.lora_B @ state.lora_A
    return model.eval()


class active:
    """Activate ``entry`` (a name, a stack, or BASE: the adapters disabled) for a block."""

    def __init__(self, adapter_model: AdapterModel, entry: str | list[str]) -> None:
        self.adapter_model, self.entry = adapter_model, entry

    def __enter__(self) -> None:
        self.before = self.adapter_model.active_adapters
        if self.entry == BASE:
            self.disabled = self.adapter_model.disable_adapter()
            self.disabled.__enter__()
        else:
            self.adapter_model.set_adapter(self.entry)

    def __exit__(self, *exc: object) -> None:
        if self.entry == BASE:
            self.disabled.__exit__(*exc)
        self.adapter_model.set_adapter(self.before)


@pytest.mark.parametrize("family", ["llama", "llama_tied"])
def test_a_peft_trained_combined_adapter_is_served_stacked_per_sample_and_merged(tmp_path, family):
    peft_model, path = peft_trained(family, tmp_path / "peft")
    ids = input_ids()
    with torch.no_grad():
        peft_out = logits(peft_model, {"input_ids": ids})
        base_out = logits(build(family), {"input_ids": ids})
    assert not torch.allclose(peft_out, base_out)

    # 1. Publish: PEFT's folder is one adapter, which publish_folder takes as it is.
    registry = Registry(tmp_path / "registry")
    assert registry.publish_folder(path, COMBINED) == 1
    assert registry.names() == [COMBINED]

    # 2. Load onto a fresh base model: one adapter, PEFT's outputs.
    served = registry.load(build(family), COMBINED)
    assert served.adapters == served.active_adapters == [COMBINED]
    config = served.adapter_configs[COMBINED]
    assert isinstance(config, LoraLinearConfig)
    assert (config.r, config.lora_alpha, config.trainable_token_indices) == (4, 8, TOKENS)
    states = {
        name: module.adapters[COMBINED]
        for name, module in served.model.named_modules()
        if isinstance(module, AdapterLayer) and COMBINED in module.adapters
    }
    lora_layers = [name for name, state in states.items() if isinstance(state, LoraLinearLayer)]
    assert len(lora_layers) == (5 if family == "llama" else 7)  # the list; every projection, not the head
    rows = [name for name, state in states.items() if isinstance(state, TrainableTokensLayer)]
    # the rows: the embedding's, and a tied head's (sharing the very same state), as in PEFT
    assert rows == (["model.embed_tokens"] if family == "llama" else ["model.embed_tokens", "lm_head"])
    with torch.no_grad():
        combined_out = logits(served, {"input_ids": ids})
        assert_same_math(combined_out, peft_out)
        # set_adapter and adapter_names of its one name take its rows too
        served.set_adapter(COMBINED)
        assert_same_math(logits(served, {"input_ids": ids}), peft_out)
        per_sample = served(input_ids=ids, adapter_names=[COMBINED] * len(ids)).logits
        assert_same_math(per_sample, peft_out)

    # 3. Stack a second trainable-tokens adapter on it (102 is in both: the later one's row wins).
    served.add_adapter("extra", TrainableTokensConfig(token_indices=EXTRA, init_weights=False))
    served.set_adapter(STACK)
    served.eval()
    with torch.no_grad():
        stack_out = logits(served, {"input_ids": ids})
        with active(served, "extra"):
            extra_out = logits(served, {"input_ids": ids})
        assert_same_math(stack_out, logits(by_hand(family, served), {"input_ids": ids}))
    assert not torch.allclose(stack_out, combined_out)

    # 4. One batch, each sample its own stack: equal to each sample run alone.
    entries: list[str | list[str]] = [COMBINED, STACK, BASE, "extra"]
    with torch.no_grad():
        together = served(input_ids=ids, adapter_names=entries).logits
        for row, entry in enumerate(entries):
            with active(served, entry):
                alone = served(input_ids=ids[row : row + 1]).logits
            assert_same_math(together[row : row + 1], alone)
    # ... and to the whole batch run with that stack (the samples do not leak into each other).
    for row, whole in enumerate([combined_out, stack_out, base_out, extra_out]):
        assert_same_math(together[row : row + 1], whole[row : row + 1])
    generated = served.generate(
        input_ids=ids, adapter_names=entries, max_new_tokens=3, do_sample=False, pad_token_id=0
    )
    for row, entry in enumerate(entries):
        with active(served, entry):
            alone = served.generate(
                input_ids=ids[row : row + 1], max_new_tokens=3, do_sample=False, pad_token_id=0
            )
        assert torch.equal(generated[row : row + 1], alone)
    assert served.active_adapters == STACK

    # 5. Merge the stack into a plain transformers model: the stack's outputs.
    plain = served.merge_and_unload()
    assert type(plain).__name__ == "LlamaForCausalLM"
    assert not any(isinstance(m, AdapterLayer) for m in plain.modules())
    assert (plain.lm_head.weight is plain.model.embed_tokens.weight) is (family == "llama_tied")
    assert plain.model.embed_tokens.weight.shape == (VOCAB, 16)
    with torch.no_grad():
        assert_same_math(logits(plain, {"input_ids": ids}), stack_out)
