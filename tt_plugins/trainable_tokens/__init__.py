"""Trainable tokens: train only chosen rows of the token embedding (and of a tied head)."""

from tt_plugins.trainable_tokens.config import TrainableTokensConfig
from tt_plugins.trainable_tokens.layer import TrainableTokensLayer

__all__ = ["TrainableTokensConfig", "TrainableTokensLayer"]
