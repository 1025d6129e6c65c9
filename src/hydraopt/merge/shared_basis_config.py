"""The shared-basis merge's typed config (torch-free; the method is
:mod:`~hydraopt.merge.shared_basis_method`, the tensor functions :mod:`~hydraopt.merge.shared_basis`).

Kept apart from the tensor code so that the registry can declare the method, and the CLI build its
flags, without importing torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from hydraopt.errors import HydraoptError
from hydraopt.merge.choices import DISTANCES, Distance

Core = Literal["full", "diagonal"]
CORES: tuple[str, ...] = ("full", "diagonal")


@dataclass(frozen=True)
class SharedBasisConfig:
    """Options of the shared-basis merge.

    Attributes:
        rank: R, the same in every module; exactly one of ``rank`` and ``budget`` is given.
        budget: storage in percent of the K separate adapters' 16-bit bytes (their parameters,
            the bundle being stored at 16 bits); the allocator (:mod:`shared_basis_budget`)
            picks R per module where it buys the most error.
        core: ``full`` (an R x R core per task) or ``diagonal`` (R numbers per task).
        distance: f of the refinement and of the reported errors (``mae`` as HydraOpt).
        sweeps: at most this many alternating sweeps after the HOSVD start (each never
            increases the squared error).
        sweep_tol: stop the sweeps once one lowers the squared error by less than this
            fraction in that module (0: always ``sweeps``). Why 1e-3 (issue 18):
            at K = 100 and SmolLM2 shape a sweep cost 0.2-0.8 CPU s per module and 8 sweeps
            made the method 4x slower than HydraOpt M = 1, while the later sweeps each moved
            the squared error by < 0.05 % (and < 1e-5 after the first at R = 64).
        cp_sweeps: diagonal cores: CP-ALS sweeps with free (unit-norm, not orthonormal) U, V
            after the orthonormal ones (0 keeps U, V orthonormal).
        refine_steps: Adam steps on the distance (0 = closed form only); the best iterate per
            module is kept, never worse than the closed form.
        refine_lr: learning rate relative to each factor's RMS.
    """

    rank: int | None = None
    budget: float | None = None
    core: Core = "full"
    distance: Distance = "mae"
    sweeps: int = 8
    sweep_tol: float = 1e-3
    cp_sweeps: int = 30
    refine_steps: int = 0
    refine_lr: float = 0.02

    def __post_init__(self) -> None:
        if (self.rank is None) == (self.budget is None):
            raise HydraoptError(
                "give exactly one of --rank R (uniform) and --budget PCT (percent of the "
                "separate adapters' parameters)"
            )
        if self.rank is not None and self.rank < 1:
            raise HydraoptError(f"--rank must be >= 1, got {self.rank}")
        if self.budget is not None and not 0.0 < self.budget <= 100.0:
            raise HydraoptError(f"--budget is a percentage in (0, 100], got {self.budget}")
        if self.core not in CORES:
            raise HydraoptError(f"core must be one of {CORES}, got {self.core!r}")
        if self.distance not in DISTANCES:
            raise HydraoptError(f"distance must be one of {DISTANCES}, got {self.distance!r}")
        if min(self.sweeps, self.cp_sweeps, self.refine_steps) < 0:
            raise HydraoptError("sweeps, cp_sweeps and refine_steps must be >= 0")
        if not 0.0 <= self.sweep_tol < 1.0:
            raise HydraoptError(f"sweep_tol must be in [0, 1), got {self.sweep_tol}")
        if not self.refine_lr > 0:
            raise HydraoptError(f"refine_lr must be > 0, got {self.refine_lr}")
