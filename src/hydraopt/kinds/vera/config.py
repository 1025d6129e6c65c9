"""The typed config of HydraOpt on VeRA adapters.

Kept apart from :mod:`hydraopt.kinds.vera.merge` (and free of ``hydraopt.merge`` imports at module
level) because the registered HydraOpt class names it as its ``vera_config_class`` while
``hydraopt.merge`` is still being imported.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from hydraopt.errors import HydraoptError

Shared = Literal["lambda_d", "lambda_b"]
SHARED_SIDES: tuple[Shared, ...] = ("lambda_d", "lambda_b")


@dataclass(frozen=True)
class VeraHydraOptConfig:
    """Options of HydraOpt on VeRA vectors.

    Attributes:
        heads: M, rows of the routed vector per module (1 <= M <= K).
        distance: f, the distance minimised: ``mae`` (paper default), ``mse``, ``fro`` or ``cos``.
        shared: the vector one row of which all tasks share; the other gets M rows.
            ``lambda_d`` (the paper's choice: λd starts from the same constant in every task, as
            LoRA's A is shared) or ``lambda_b``. See docs/methods.md for the measurement.
        restarts: k-means++ starts of the routing (1 < M < K).
        refine_steps: Adam steps on the hard-routed distance (0 = closed form only).
        refine_lr: learning rate relative to the vectors' RMS.
    """

    heads: int
    distance: Literal["mae", "mse", "fro", "cos"] = "mae"
    shared: Shared = "lambda_d"
    restarts: int = 8
    refine_steps: int = 100
    refine_lr: float = 0.05

    def __post_init__(self) -> None:
        from hydraopt.merge.base import check_heads  # here: see the module doc
        from hydraopt.merge.distances import DISTANCES

        check_heads(self.heads)
        if self.distance not in DISTANCES:
            raise HydraoptError(f"distance must be one of {DISTANCES}, got {self.distance!r}")
        if self.shared not in SHARED_SIDES:
            raise HydraoptError(f"shared must be one of {SHARED_SIDES}, got {self.shared!r}")
        if self.refine_steps < 0 or self.restarts < 1:
            raise HydraoptError("refine_steps must be >= 0 and restarts >= 1")
        if self.refine_lr <= 0:
            raise HydraoptError(f"refine_lr must be > 0, got {self.refine_lr}")
