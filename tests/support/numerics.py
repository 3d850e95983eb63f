"""Tolerances for comparing two float computations of the same math, stated from the arithmetic.

Two programs that compute the same sum of ``terms`` float products in different
orders (a sparse path against a dense one, another library's kernels, another
CPU's vector width) may round differently. The classical bound for a sum of n
terms (Higham, *Accuracy and Stability of Numerical Algorithms*, section 3.1)
is ``n * u * sum|x_i|`` with ``u`` the unit roundoff; we take the largest
magnitude among the expected values as the scale of those sums. The bound holds
on any machine, so the suite passes wherever float32 is IEEE float32, not only
on the machine that wrote it (the ad-hoc ``atol=1e-6`` it replaces failed with
AVX2 and SSE kernels: 2 to 4 ulp differences on logits around 7).
"""

from __future__ import annotations

import torch
from models import WIDTH

# The reductions in the tiny test models are at most this long: the hidden width for the
# logits and the embedding fold, the MLP's intermediate size, a LoRA rank, a softmax row.
SUMMED_TERMS = 2 * WIDTH


def rounding_tolerance(expected: torch.Tensor, terms: int = SUMMED_TERMS) -> float:
    """The most two orders of ``terms``-long sums at ``expected``'s magnitude can differ by."""
    unit_roundoff = torch.finfo(expected.dtype).eps / 2
    scale = max(float(expected.detach().abs().max()), 1.0)
    return terms * unit_roundoff * scale


def assert_same_math(actual: torch.Tensor, expected: torch.Tensor, terms: int = SUMMED_TERMS) -> None:
    """``actual`` equals ``expected`` up to the rounding of ``terms``-long float sums."""
    torch.testing.assert_close(
        actual, expected, rtol=0, atol=rounding_tolerance(expected, terms), msg=lambda text: (
            f"{text}\n(tolerance: {terms} summed terms x unit roundoff x the values' largest magnitude)"
        )
    )
