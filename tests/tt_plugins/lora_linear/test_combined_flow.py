"""End to end with the real peft: a combined adapter PEFT trained, served from a registry, stacked, merged.

PEFT trains ``LoraConfig(target_modules=..., trainable_token_indices=[...])``
(LoRA on the projections and new token rows, one PEFT adapter) and saves it;
tt-adapters publishes it to a registry, loads it onto a fresh base model,
stacks a second trainable-tokens adapter on it, serves a batch whose samples
use the combined adapter, the stack and the base model, and merges the stack
into a plain transformers model. Each step is checked against the step
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
from tt_plugins.trainable_tokens import TrainableTokensConfig

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

TOKENS = [100, 101, 102]  # the combined adapter's new token rows
EXTRA = [102, 103]  # the second adapter's rows: 102 overlaps, and the later adapter in a stack wins
# PEFT's two ways of naming the projections: a list (untied model) and "all-linear" (tied model).
TARGETS: dict[str, Any] = {
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"],
    "llama_tied": "all-linear",
}
COMBINED = ["combined", "combined_tokens"]  # how tt-adapters holds PEFT's one adapter: LoRA, then the rows
STACK = [*COMBINED, "extra"]


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
        for name in ("combined_tokens", "extra"):
            state = embed.adapters[name]
            weight[state.token_indices] = state.trainable_tokens_rows
        if family == "llama":  # an untied head keeps its own rows: PEFT's rows are the embedding's only
            assert not isinstance(served.model.lm_head, AdapterLayer)
        for name, module in served.model.named_modules():
            state = (
                module.adapters["combined"]
                if isinstance(module, AdapterLayer) and "combined" in module.adapters
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

    # 1. Publish. One PEFT adapter is two here (LoRA, rows), so publish_folder, which takes one adapter
    # without a model, refuses it and says how; that route publishes each adapter of the loaded folder.
    registry = Registry(tmp_path / "registry")
    with pytest.raises(ValueError, match=r"two adapters \['default', 'default_tokens'\].*Registry\.publish"):
        registry.publish_folder(path, "combined")
    assert registry.names() == []
    loaded = AdapterModel.from_pretrained(build(family), path)
    assert loaded.active_adapters == ["default", "default_tokens"]
    assert registry.publish(loaded, "combined", adapter="default") == 1
    assert registry.publish(loaded, "combined_tokens", adapter="default_tokens") == 1
    # The same files also publish with publish_folder, from tt-adapters' own save of the loaded adapters.
    loaded.save_pretrained(tmp_path / "native")
    assert registry.publish_folder(tmp_path / "native", "combined", adapter="default") == 2
    assert registry.publish_folder(tmp_path / "native", "combined_tokens", adapter="default_tokens") == 2

    # 2. Load onto a fresh base model: PEFT's outputs.
    served = registry.load(build(family), COMBINED)
    assert served.active_adapters == COMBINED
    configs = served.adapter_configs
    assert isinstance(configs["combined"], LoraLinearConfig)
    assert (configs["combined"].r, configs["combined"].lora_alpha) == (4, 8)
    assert isinstance(configs["combined_tokens"], TrainableTokensConfig)
    assert configs["combined_tokens"].token_indices == TOKENS
    lora_layers = [
        name
        for name, module in served.model.named_modules()
        if isinstance(module, AdapterLayer) and "combined" in module.adapters
    ]
    assert len(lora_layers) == (5 if family == "llama" else 7)  # the list; every projection, not the head
    with torch.no_grad():
        combined_out = logits(served, {"input_ids": ids})
    assert_same_math(combined_out, peft_out)

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
