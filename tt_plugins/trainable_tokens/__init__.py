"""Trainable tokens: train only chosen rows of the token embedding (and of a tied head)."""

from tt_plugins.trainable_tokens.config import TrainableTokensConfig, add_new_tokens
from tt_plugins.trainable_tokens.layer import TrainableTokensLayer
from tt_plugins.trainable_tokens.tokens import token_ids

__all__ = ["TrainableTokensConfig", "TrainableTokensLayer", "add_new_tokens", "token_ids"]
