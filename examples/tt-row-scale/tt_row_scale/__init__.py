"""Row scaling: multiply chosen rows of the token embedding (and of a tied head) by trainable factors."""

from tt_row_scale.config import RowScaleConfig
from tt_row_scale.layer import RowScaleLayer

__all__ = ["RowScaleConfig", "RowScaleLayer"]
