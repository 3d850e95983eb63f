"""The setups compared, each built over a module tree that shares the base model's weights.

A setup is a function ``(model, shape) -> Setup`` registered under a name with
:func:`register_setup`. ``model`` is the setup's own copy of the module tree
(:func:`sharing_copy`: same parameter and buffer tensors as the base, ties
kept); the function makes some parameters trainable, or adds them, and says how
to save the result. Measurement and report code only see :class:`Setup`.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ttbench.shapes import Shape

SetupFactory = Callable[[nn.Module, Shape], "Setup"]
FACTORIES: dict[str, SetupFactory] = {}
REFERENCE = "floor"  # the setup every other one is compared with; always run


def sharing_copy(model: nn.Module) -> nn.Module:
    """A new module tree over the same parameters and buffers (ties kept: one memo entry per tensor)."""
    return copy.deepcopy(model, memo={id(t): t for t in [*model.parameters(), *model.buffers()]})


@dataclasses.dataclass
class Setup:
    """One setup, ready to train.

    ``save`` writes its checkpoint into a folder (None: nothing to save).
    ``infer``: time its unmerged inference against the base model.
    ``extra_inputs``: keyword arguments a call needs beside ``input_ids``, given
    the ids (e.g. one adapter name per sample); computed outside the timed calls
    for inference, per step for training.
    ``without_tokens``: for a stack, the setup holding the same stack less its
    trainable-tokens adapters (the stack table gives the ratio of the two).
    ``versus``: the setup that does the same with PEFT (the side-by-side table
    gives the ratios of the two, when both ran).
    """

    name: str
    model: nn.Module
    trainable: list[nn.Parameter]
    save: Callable[[Path], None] | None
    optimizer: torch.optim.Optimizer | None = None
    infer: bool = False
    extra_inputs: Callable[[torch.Tensor], dict[str, Any]] | None = None
    without_tokens: str | None = None  # the setup that is this one less its trainable tokens
    versus: str | None = None  # the setup doing the same with another library (PEFT), side by side

    def __post_init__(self) -> None:
        if not self.trainable or not all(p.requires_grad for p in self.trainable):
            raise RuntimeError(f"{self.name}: the setup has no trainable parameters, or frozen ones")

    def inputs(self, input_ids: torch.Tensor) -> dict[str, Any]:
        """The keyword arguments of one call on ``input_ids``."""
        extra = self.extra_inputs(input_ids) if self.extra_inputs is not None else {}
        return {"input_ids": input_ids, **extra}


def register_setup(name: str) -> Callable[[SetupFactory], SetupFactory]:
    """Register ``(model, shape) -> Setup`` under ``name`` (``--setups name`` runs it)."""

    def register(factory: SetupFactory) -> SetupFactory:
        if name in FACTORIES:
            raise ValueError(f"setup {name!r} is registered already")
        FACTORIES[name] = factory
        return factory

    return register


def setup_names() -> list[str]:
    return list(FACTORIES)


def make_setup(name: str, base: nn.Module, shape: Shape) -> Setup:
    factory = FACTORIES.get(name)
    if factory is None:
        raise ValueError(f"unknown setup {name!r}")
    return factory(sharing_copy(base), shape)


@register_setup("floor")
def floor_setup(model: nn.Module, shape: Shape) -> Setup:
    """The frozen base; the only trainable parameter is a zero bias on the embedding output."""
    embedding: nn.Module = model.get_input_embeddings()  # type: ignore[operator]
    weight: torch.Tensor = embedding.weight  # type: ignore[assignment]
    bias = nn.Parameter(torch.zeros(shape.width, device=weight.device, dtype=weight.dtype))
    embedding.register_forward_hook(lambda _module, _args, output: output + bias)
    model.floor_bias = bias  # keeps it alive with the model
    return Setup("floor", model, [bias], None)


@register_setup("tt")
def tt_setup(model: nn.Module, shape: Shape) -> Setup:
    """tt_core.get_adapter_model with TrainableTokensConfig."""
    from tt_core import get_adapter_model
    from tt_plugins.trainable_tokens import TrainableTokensConfig

    adapter_model = get_adapter_model(model, TrainableTokensConfig(token_indices=shape.token_indices))
    trainable = [p for p in adapter_model.parameters() if p.requires_grad]
    return Setup("tt", adapter_model, trainable, lambda path: adapter_model.save_pretrained(path), infer=True)


@register_setup("peft")
def peft_setup(model: nn.Module, shape: Shape) -> Setup:
    """peft.get_peft_model with peft.TrainableTokensConfig."""
    import peft

    peft_model = peft.get_peft_model(model, peft.TrainableTokensConfig(token_indices=shape.token_indices))
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    return Setup(
        "peft", peft_model, trainable, lambda path: peft_model.save_pretrained(str(path)), infer=True
    )


@register_setup("full")
def full_setup(model: nn.Module, shape: Shape) -> Setup:
    """The input embedding (and a head tied to it) trained whole."""
    embedding: nn.Module = model.get_input_embeddings()  # type: ignore[operator]
    weight = nn.Parameter(embedding.weight.detach().clone())  # type: ignore[operator]
    embedding.weight = weight
    if shape.tied:
        model.get_submodule("lm_head").weight = weight
    return Setup("full", model, [weight], None)


# ------------------------------------------------------------------ stacks
# Stacks of named adapters on one model: "tokens" are trainable tokens (the
# shape's k ids), "lora" a LoRA of rank STACK_RANK on the embedding (and on a
# head tied to it). A second adapter of a kind gets its own name; a second
# tokens adapter takes k ids half of which the first one also holds.
STACK_RANK = 8
STACKS: dict[str, tuple[list[str], str | None]] = {
    # name: (the stack, in order; the setup that is the same stack less its tokens)
    "tt2": (["tokens", "tokens"], None),
    "lora": (["lora"], None),
    "lora2": (["lora", "lora"], None),
    "tt_lora": (["tokens", "lora"], "lora"),
    "lora_tt": (["lora", "tokens"], "lora"),
    "stack4": (["tokens", "lora", "tokens", "lora"], "lora2"),
}
#: ``--setups stacks`` runs these (``peft_lora`` is PEFT's LoRA on the embedding with a tied head).
STACK_SETUPS = [*STACKS, "peft_lora"]


def second_token_indices(shape: Shape) -> list[int]:
    """The ids of a second tokens adapter: k ids, the upper half of them shared with the first."""
    half = shape.rows // 2
    return list(range(shape.vocab - shape.rows - half, shape.vocab - half))


def stack_setup(name: str, model: nn.Module, shape: Shape) -> Setup:
    """The stack ``STACKS[name]`` built with tt_core, every adapter active and trained."""
    from tt_core import AdapterModel
    from tt_plugins.lora_embedding import LoraEmbeddingConfig
    from tt_plugins.trainable_tokens import TrainableTokensConfig

    kinds, without_tokens = STACKS[name]
    adapter_model = AdapterModel(model)
    names: list[str] = []
    for kind in kinds:
        seen = sum(1 for earlier in names if earlier.startswith(kind))
        adapter_name = kind if seen == 0 else f"{kind}{seen + 1}"
        if kind == "tokens":
            ids = shape.token_indices if seen == 0 else second_token_indices(shape)
            adapter_model.add_adapter(adapter_name, TrainableTokensConfig(token_indices=ids))
        else:
            adapter_model.add_adapter(
                adapter_name, LoraEmbeddingConfig(r=STACK_RANK, lora_alpha=2 * STACK_RANK)
            )
        names.append(adapter_name)
    adapter_model.set_adapter(names)
    trainable = [p for p in adapter_model.parameters() if p.requires_grad]
    return Setup(
        name,
        adapter_model,
        trainable,
        lambda path: adapter_model.save_pretrained(path),
        infer=True,
        without_tokens=without_tokens,
    )


def _register_stack(name: str) -> None:
    register_setup(name)(lambda model, shape: stack_setup(name, model, shape))


for _name in STACKS:
    _register_stack(_name)


@register_setup("peft_lora")
def peft_lora_setup(model: nn.Module, shape: Shape) -> Setup:
    """peft.LoraConfig(r=8) on the input embedding; ``ensure_weight_tying`` puts it on a tied head too.

    What PEFT 0.21 can express of the stacks: it refuses trainable tokens on an
    embedding that LoRA targets (``TypeError: trainable_token_indices cannot be
    applied to modules of type lora.Embedding``), and a second LoRA added with
    ``add_adapter`` is not tied onto the head.
    """
    import peft

    embedding = next(n for n, m in model.named_modules() if m is model.get_input_embeddings())  # type: ignore[operator]
    config = peft.LoraConfig(
        r=STACK_RANK,
        lora_alpha=2 * STACK_RANK,
        target_modules=[embedding.rsplit(".", 1)[-1]],
        ensure_weight_tying=shape.tied,
    )
    peft_model = peft.get_peft_model(model, config)
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    return Setup(
        "peft_lora",
        peft_model,
        trainable,
        lambda path: peft_model.save_pretrained(str(path)),
        infer=True,
    )


# ------------------------------------------------------- LoRA on linear layers
# LoRA of rank LINEAR_RANK on every projection of the decoder layers (PEFT's "all-linear" for Llama,
# named explicitly so that both libraries adapt exactly these), the base model frozen.
LINEAR_RANK = 8
LINEAR_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
#: ``--setups linear`` runs these: tt-adapters' LoRA on linear layers beside PEFT's.
LINEAR_SETUPS = ["lora_linear", "peft_lora_linear"]


@register_setup("lora_linear")
def lora_linear_setup(model: nn.Module, shape: Shape) -> Setup:
    """tt_core.get_adapter_model with LoraLinearConfig(r=8, lora_alpha=16) on every projection."""
    from tt_core import get_adapter_model
    from tt_plugins.lora_linear import LoraLinearConfig

    config = LoraLinearConfig(r=LINEAR_RANK, lora_alpha=2 * LINEAR_RANK, target_modules=LINEAR_TARGETS)
    adapter_model = get_adapter_model(model, config)
    trainable = [p for p in adapter_model.parameters() if p.requires_grad]
    return Setup(
        "lora_linear",
        adapter_model,
        trainable,
        lambda path: adapter_model.save_pretrained(path),
        infer=True,
        versus="peft_lora_linear",
    )


@register_setup("peft_lora_linear")
def peft_lora_linear_setup(model: nn.Module, shape: Shape) -> Setup:
    """peft.get_peft_model with peft.LoraConfig(r=8, lora_alpha=16) on the same projections."""
    import peft

    config = peft.LoraConfig(r=LINEAR_RANK, lora_alpha=2 * LINEAR_RANK, target_modules=LINEAR_TARGETS)
    peft_model = peft.get_peft_model(model, config)
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    return Setup(
        "peft_lora_linear",
        peft_model,
        trainable,
        lambda path: peft_model.save_pretrained(str(path)),
        infer=True,
    )


def added_bytes(setup: Setup, base: nn.Module) -> int:
    """Bytes of the parameters and buffers a setup holds beyond the base model's."""
    base_pointers = {t.data_ptr() for t in [*base.parameters(), *base.buffers()]}
    seen: set[int] = set()
    total = 0
    for tensor in [*setup.model.parameters(), *setup.model.buffers()]:
        pointer = tensor.data_ptr()
        if pointer in base_pointers or pointer in seen or tensor.device.type == "meta":
            continue
        seen.add(pointer)
        total += tensor.numel() * tensor.element_size()
    return total


def trainable_bytes(setup: Setup) -> int:
    """Bytes of the trainable parameters (each storage once): their gradients take as many,
    AdamW's state twice as many."""
    storages = {p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for p in setup.trainable}
    return sum(storages.values())


def train_step(setup: Setup, input_ids: torch.Tensor) -> None:
    """Forward, LlamaForCausalLM loss with labels = input ids, backward, AdamW step."""
    if setup.optimizer is None:
        setup.optimizer = torch.optim.AdamW(setup.trainable, lr=1e-4)
    extra = setup.extra_inputs(input_ids) if setup.extra_inputs is not None else {}
    loss = setup.model(input_ids=input_ids, labels=input_ids, **extra).loss
    loss.backward()
    setup.optimizer.step()
    setup.optimizer.zero_grad(set_to_none=True)
