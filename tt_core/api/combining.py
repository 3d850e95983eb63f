"""What the ``combine`` hook is handed: the combination asked for, and each adapted weight's sources.

:meth:`AdapterModel.add_weighted_adapter` builds one :class:`Combination` (its
arguments, checked here so that every method refuses the same bad input the
same way) and one :class:`CombineSite` per adapted weight, then asks the
sources' method to combine them. The names and meanings are PEFT's
(``LoraModel.add_weighted_adapter``); :mod:`tt_core.tensors.task_vectors`
holds the arithmetic of the task-vector types.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Collection
from typing import TYPE_CHECKING, Any

from tt_core.api.errors import ArgumentTypeError, ConfigError

if TYPE_CHECKING:
    from torch import nn

    from tt_core.tensors.state import AdapterState

#: Every combination type PEFT names, with ``cat``; each method supports some of them.
COMBINATION_TYPES = (
    "svd",
    "linear",
    "cat",
    "ties",
    "ties_svd",
    "dare_ties",
    "dare_linear",
    "dare_ties_svd",
    "dare_linear_svd",
    "magnitude_prune",
    "magnitude_prune_svd",
)
#: Types that trim or drop entries, and so need ``density``.
DENSITY_TYPES = frozenset(
    {
        "ties",
        "ties_svd",
        "dare_ties",
        "dare_linear",
        "dare_ties_svd",
        "dare_linear_svd",
        "magnitude_prune",
        "magnitude_prune_svd",
    }
)
#: Types that elect a sign per entry (``majority_sign_method``).
SIGN_TYPES = frozenset({"ties", "ties_svd", "dare_ties", "dare_ties_svd"})
#: Types that drop entries at random (``seed``).
RANDOM_TYPES = frozenset({"dare_ties", "dare_linear", "dare_ties_svd", "dare_linear_svd"})
#: Types that end in a truncated SVD (``svd_rank``, ``svd_clamp``, ``svd_full_matrices``, ``svd_driver``).
SVD_TYPES = frozenset({"svd", "ties_svd", "dare_ties_svd", "dare_linear_svd", "magnitude_prune_svd"})
SVD_DRIVERS = (None, "gesvd", "gesvdj", "gesvda")


@dataclasses.dataclass(frozen=True)
class Combination:
    """One call of ``add_weighted_adapter``: the sources, their weights and the type's options.

    Checked when built: a weight that is not a finite number, a negative
    weight for a type that elects signs before weighting (the ``ties`` family:
    a negative weight would flip a value after it voted for the other sign),
    a ``density`` outside (0, 1], or an option the type does not use is a
    :class:`ConfigError` naming it and the fix. ``seed`` is always set for
    the random types (drawn by the core when the caller gave none), so the
    result can be reproduced from what the manifest records.
    """

    combination_type: str
    adapters: tuple[str, ...]
    weights: tuple[float, ...]
    density: float | None = None
    majority_sign_method: str = "total"
    seed: int | None = None
    svd_rank: int | None = None
    svd_clamp: float | None = None
    svd_full_matrices: bool = True
    svd_driver: str | None = None

    def __post_init__(self) -> None:
        kind = self.combination_type
        if kind not in COMBINATION_TYPES:
            raise ConfigError(
                f"combination_type={kind!r} is not a combination type; give one of {list(COMBINATION_TYPES)}"
            )
        if len(self.weights) != len(self.adapters):
            raise ConfigError(
                f"{len(self.adapters)} adapters {list(self.adapters)} but {len(self.weights)} weights "
                f"{list(self.weights)}; give one weight per adapter"
            )
        for adapter, weight in zip(self.adapters, self.weights, strict=True):
            if isinstance(weight, bool) or not isinstance(weight, numbers.Real):
                raise ArgumentTypeError(f"the weight of {adapter!r} is {weight!r}; weights are numbers")
            if not math.isfinite(weight):
                raise ConfigError(f"the weight of {adapter!r} is {weight!r}; give a finite number")
            if weight < 0 and kind in SIGN_TYPES:
                raise ConfigError(
                    f"the weight of {adapter!r} is {weight!r}, but {kind!r} elects each entry's sign before "
                    "weighting, so a negative weight would flip values after they voted; give weights >= 0, "
                    "or use 'linear' (or 'svd') to subtract an adapter"
                )
        object.__setattr__(self, "weights", tuple(float(w) for w in self.weights))
        self._check_options()

    def _check_options(self) -> None:
        kind = self.combination_type
        if kind in DENSITY_TYPES:
            density = self.density
            if density is None:
                raise ConfigError(
                    f"combination_type={kind!r} needs density, the fraction kept, e.g. density=0.5"
                )
            if isinstance(density, bool) or not isinstance(density, numbers.Real):
                raise ArgumentTypeError(f"density must be a number in (0, 1], got {density!r}")
            if not 0 < density <= 1:
                raise ConfigError(
                    f"density={density!r} is outside (0, 1]; it is the fraction of entries kept "
                    "(1 keeps every entry)"
                )
            object.__setattr__(self, "density", float(density))
        self._refuse_unused("density", self.density, None, DENSITY_TYPES)
        if self.majority_sign_method not in ("total", "frequency"):
            raise ConfigError(
                f"majority_sign_method={self.majority_sign_method!r}; give 'total' (the sign of the sum) or "
                "'frequency' (the sign most adapters have)"
            )
        if self.seed is not None and (
            isinstance(self.seed, bool) or not isinstance(self.seed, numbers.Integral)
        ):
            raise ArgumentTypeError(f"seed must be a whole number, got {self.seed!r}")
        self._refuse_unused("seed", self.seed, None, RANDOM_TYPES)
        rank = self.svd_rank
        if rank is not None and (
            isinstance(rank, bool) or not isinstance(rank, numbers.Integral) or rank < 1
        ):
            raise ConfigError(
                f"svd_rank={rank!r} is not a rank; give a whole number >= 1 (None: the largest)"
            )
        clamp = self.svd_clamp
        if clamp is not None and (
            isinstance(clamp, bool) or not isinstance(clamp, numbers.Real) or not 0 <= clamp <= 1
        ):
            raise ConfigError(f"svd_clamp={clamp!r} is not a quantile; give a number in [0, 1], or None")
        if self.svd_driver not in SVD_DRIVERS:
            raise ConfigError(f"svd_driver={self.svd_driver!r}; give one of {list(SVD_DRIVERS)}")
        if not isinstance(self.svd_full_matrices, bool):
            raise ArgumentTypeError(
                f"svd_full_matrices must be True or False, got {self.svd_full_matrices!r}"
            )
        self._refuse_unused("svd_rank", rank, None, SVD_TYPES)
        self._refuse_unused("svd_clamp", clamp, None, SVD_TYPES)
        self._refuse_unused("svd_driver", self.svd_driver, None, SVD_TYPES)
        self._refuse_unused("svd_full_matrices", self.svd_full_matrices, True, SVD_TYPES)

    def _refuse_unused(self, option: str, value: object, default: object, types: Collection[str]) -> None:
        if value != default and self.combination_type not in types:
            raise ConfigError(
                f"{option}={value!r} does nothing with combination_type={self.combination_type!r}; "
                "it applies "
                f"to {sorted(types)}. Leave it out."
            )

    def refuse_unsupported(self, method: str, supported: Collection[str]) -> None:
        """Raise a ConfigError unless this combination's type is one of ``supported`` (a method's)."""
        if self.combination_type not in supported:
            raise ConfigError(
                f"method {method!r} cannot combine adapters with combination_type="
                f"{self.combination_type!r}; it supports {[t for t in COMBINATION_TYPES if t in supported]}"
            )

    def record(self) -> dict[str, Any]:
        """The options this type used, as the manifest's ``combined_from`` records them."""
        kind = self.combination_type
        options: dict[str, Any] = {}
        if kind in DENSITY_TYPES:
            options["density"] = self.density
        if kind in SIGN_TYPES:
            options["majority_sign_method"] = self.majority_sign_method
        if kind in RANDOM_TYPES:
            options["seed"] = self.seed
        if kind in SVD_TYPES:
            options["svd_rank"] = self.svd_rank
            options["svd_clamp"] = self.svd_clamp
        return options


@dataclasses.dataclass(frozen=True)
class CombineSite:
    """One adapted weight: the modules applying it, the base module, and each source's state on it.

    ``modules`` lists the target first, then the modules tied to it (the same
    for every source: the core refuses sources with other targets).
    ``states[i]`` is the state of ``Combination.adapters[i]``. ``base_layer``
    is the unwrapped base module; no adapter is merged into its weight (the
    core refuses to combine then), so ``base_layer.weight`` holds the base rows.
    """

    modules: list[str]
    base_layer: nn.Module
    states: list[AdapterState]
