"""Row scaling passes the tt-adapters conformance kit: run `pytest` after `pip install .`."""

import pytest
from tt_row_scale import RowScaleConfig

from tt_core import testing


def make_config(vocab):
    # Random factors (init_weights=False), so every check sees the adapter at work.
    return RowScaleConfig(token_indices=[3, 17, vocab - 1], init_weights=False)


def fold(state, weight):
    # The effective weight, by hand: row i becomes W[i] * s_i.
    rows = weight[state.token_indices] * state.row_scale.unsqueeze(-1)
    return weight.index_copy(0, state.token_indices, rows)


BAD_CONFIGS = [
    lambda vocab: RowScaleConfig(token_indices=[3, vocab]),  # out of range: refused by create_layer
    lambda vocab: RowScaleConfig(token_indices=[]),  # refused by the config itself
    lambda vocab: RowScaleConfig(token_indices=[3, 3]),
    lambda vocab: RowScaleConfig(token_indices=[3], target_modules=["no_such_module"]),
]


@pytest.mark.parametrize("family", testing.FAMILIES)
@pytest.mark.parametrize("check", testing.CHECKS)
def test_row_scale_conforms(check, family):
    testing.run_check(check, family, make_config, fold, bad_configs=BAD_CONFIGS)
