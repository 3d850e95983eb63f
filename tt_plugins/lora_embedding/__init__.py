"""LoRA on the token embedding (and on a head tied to it): a low-rank update of the whole weight."""

from tt_plugins.lora_embedding.config import LoraEmbeddingConfig
from tt_plugins.lora_embedding.layer import LoraEmbeddingLayer

__all__ = ["LoraEmbeddingConfig", "LoraEmbeddingLayer"]
