"""LoRA on linear layers (nn.Linear, and GPT-2's Conv1D): PEFT's LoRA on attention and MLP projections."""

from tt_plugins.lora_linear.config import LoraLinearConfig
from tt_plugins.lora_linear.layer import LoraLinearLayer

__all__ = ["LoraLinearConfig", "LoraLinearLayer"]
