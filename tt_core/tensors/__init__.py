"""The tensor floor: adapter states, the autograd kernels, the wrapper, folding, per-sample apply, targets.

Above :mod:`tt_core.api` only. A plugin may import it.
"""
