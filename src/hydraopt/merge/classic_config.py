"""The classic merges' names, recipes and typed config (torch-free; see :mod:`~hydraopt.merge.classic`).

Kept apart from the tensor code so that the registry can declare these methods, and the CLI build
their flags, without importing torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from hydraopt.errors import HydraoptError
from hydraopt.merge.choices import Consensus, MajoritySign, Sparsify

DefaultWeight = Literal["uniform", "unary"]

# name -> (sparsify, consensus, default weights): the table of :mod:`~hydraopt.merge.classic`.
CLASSIC: dict[str, tuple[Sparsify, Consensus, DefaultWeight]] = {
    "task_arithmetic": ("none", "sum", "uniform"),
    "magnitude_prune": ("magnitude", "sum", "uniform"),
    "ties": ("magnitude", "ties", "unary"),
    "dare_linear": ("random", "sum", "uniform"),
    "dare_ties": ("random", "ties", "unary"),
}

CLASSIC_METHODS: tuple[str, ...] = tuple(CLASSIC)
A_ONLY_METHODS: tuple[str, ...] = tuple(f"{n}_a_only" for n in CLASSIC)


@dataclass(frozen=True)
class ClassicConfig:
    """Options of the classic merges.

    Attributes:
        weights: one coefficient per task; default uniform 1/K (task_arithmetic, magnitude_prune,
            dare_linear) or unary 1 (ties, dare_ties), as in the paper.
        density: fraction of entries kept by the sparsification (ignored by task_arithmetic).
        majority_sign_method: TIES sign election, ``total`` (sum) or ``frequency`` (count).
        heads: accepted only to refuse a wrong M; the method fixes M itself (1, or K for A-only).
    """

    weights: tuple[float, ...] | None = None
    density: float = 0.5
    majority_sign_method: MajoritySign = "total"
    heads: int | None = None

    def __post_init__(self) -> None:
        if not 0.0 < self.density <= 1.0:
            raise HydraoptError(f"density must be in (0, 1], got {self.density}")
        if self.majority_sign_method not in ("total", "frequency"):
            raise HydraoptError("majority_sign_method must be 'total' or 'frequency'")
        if self.weights is not None:
            object.__setattr__(self, "weights", tuple(float(w) for w in self.weights))
