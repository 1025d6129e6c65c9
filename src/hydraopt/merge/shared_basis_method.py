"""The registered ``shared_basis`` method: ΔW_i ≈ U S_i Vᵀ per module (:mod:`shared_basis`).

Beyond the paper (issue 18): HydraOpt shares A' and keeps whole heads; here both sides are
shared and each task keeps an R x R (or diagonal) core, so storage goes far below 20 %.

Storage is set by ``rank`` (the same R in every module) or ``budget`` (percent of the K
separate adapters' parameters, i.e. of their 16-bit bytes at the bundle's 16-bit storage). A
budget is spent across modules by :func:`~hydraopt.merge.shared_basis_budget.allocate_ranks`
on each module's rank curve, which needs every module's curve first: the method implements the
engine's optional planning hooks (``needs_survey``, ``survey``, ``plan_modules``), so the engine
runs two passes (curves, allocation, then the merge of modules grouped by shape and R).

In LoRA form each task has its own head U S_i over A' = Vᵀ: M = K with the identity routing,
which is how the runtime, export and error measurement read a shared-basis bundle.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from hydraopt.errors import HydraoptError
from hydraopt.merge.base import MergeContext, method_heads, select_fields
from hydraopt.merge.registry import registered
from hydraopt.merge.shared_basis import SharedBasisConfig, task_heads
from hydraopt.merge.shared_basis_budget import (
    allocate_ranks,
    basis_params,
    budget_params,
    curve_for_distance,
    rank_curves,
    useful_rank,
)
from hydraopt.merge.shared_basis_refine import fit_shared_basis
from hydraopt.results import LoraRecord, MergedBasisModule
from hydraopt.types import LoraStack, Measured, MergedVeraStack, ModuleSpec, VeraStack

SWEEP_BUDGETS = (5.0, 10.0, 20.0)  # percent: the sweep's points when neither rank nor budget is set


@dataclass(frozen=True)
class MergedBasisResult:
    """What :meth:`SharedBasis.merge` returns for G modules: the engine reads it as a merge.

    Attributes:
        U: (G, d, R); V: (G, k, R); cores: (G, K, R, R) or (G, K, R), LoRA scale folded in.
        measured: per-task errors on the config's distance.
    """

    U: torch.Tensor
    V: torch.Tensor
    cores: torch.Tensor
    measured: Measured | None = None

    record_type: ClassVar[type[LoraRecord]] = MergedBasisModule

    @property
    def A(self) -> torch.Tensor:
        """Vᵀ (G, R, k): the shared A' of the LoRA form."""
        return self.V.transpose(1, 2)

    @property
    def heads(self) -> torch.Tensor:
        """U S_i (G, K, d, R): one head per task."""
        return task_heads(self.U, self.cores)

    @property
    def routing(self) -> torch.Tensor:
        """(G, K) the identity: task i uses head i."""
        G, K = self.cores.shape[:2]
        return torch.arange(K, device=self.U.device).expand(G, K).contiguous()

    def stored(self) -> tuple[torch.Tensor, ...]:
        """The bundle tensors, G-batched, routing last: (U, V, cores, routing)."""
        return (self.U, self.V, self.cores, self.routing)


def check_rank(rank: int, spec: ModuleSpec) -> None:
    """R must fit the module: U (d, R) and V (k, R) need R <= min(d, k) orthonormal columns."""
    if rank > min(spec.d, spec.k):
        raise HydraoptError(
            f"--rank {rank} exceeds module {spec.name} ({spec.d} x {spec.k}): "
            f"R must be <= min(d, k) = {min(spec.d, spec.k)}"
        )


@registered("shared_basis")
class SharedBasis:
    """The registered shared-basis method (see module doc)."""

    config_class: ClassVar[type] = SharedBasisConfig
    space: ClassVar[str] = "delta"
    vera_config_class: ClassVar[type | None] = None
    takes_heads: ClassVar[bool] = False
    name: ClassVar[str]

    def num_heads(self, config: SharedBasisConfig, num_tasks: int) -> int:
        return num_tasks  # one core, so one head U S_i, per task

    def label(self, num_heads: int) -> str:
        return self.name

    def applied_config(
        self, config: SharedBasisConfig, num_tasks: int, device: str = "cpu"
    ) -> dict[str, Any]:
        """The storage knob given (``rank`` or ``budget``), the core, distance, sweeps and their
        tolerance; ``cp_sweeps`` only for diagonal cores, ``refine_lr`` only when refinement steps run."""
        used = {"core", "distance", "sweeps", "sweep_tol", "refine_steps"}
        used.add("rank" if config.rank is not None else "budget")
        if config.core == "diagonal":
            used.add("cp_sweeps")
        if config.refine_steps > 0:
            used.add("refine_lr")
        return select_fields(config, used)

    def point_label(self, config: Mapping[str, Any]) -> str:
        """The storage knob of a sweep point: ``R=8`` or ``10 %`` (``diag`` for diagonal cores)."""
        rank, budget = config.get("rank"), config.get("budget")
        knob = f"R={rank}" if rank is not None else f"{budget:g} %"
        return knob + (" diag" if config.get("core") == "diagonal" else "")

    def sweep_points(
        self,
        options: dict[str, Any],
        modules: Sequence[ModuleSpec] = (),
        num_tasks: int = 0,
    ) -> list[dict[str, Any]]:
        """A sweep's option sets: the given rank or budget, else budgets of 5, 10 and 20 %.

        Given the adapters' ``modules`` and K, default budgets below the smallest basis (R = 1
        everywhere) are left out, and R = 1 stands in when none fits: small adapters (K = 1 or 2
        at r = 4..8 need 6-26 %) would otherwise fail a whole sweep that never asked for 5 %.
        """
        if options.get("rank") is not None or options.get("budget") is not None:
            return [options]
        core = options.get("core", "full")
        shapes = [m.shape_key for m in modules]
        floor = sum(basis_params(m.d, m.k, num_tasks, 1, core) for m in modules)
        fits = [p for p in SWEEP_BUDGETS if budget_params(shapes, num_tasks, p) >= floor]
        if not fits:
            return [{**options, "rank": 1}]
        return [{**options, "budget": pct} for pct in fits]

    def needs_survey(self, config: SharedBasisConfig) -> bool:
        """A budget needs every module's rank curve before any module is merged."""
        return config.budget is not None

    def survey(self, stack: LoraStack, config: SharedBasisConfig) -> torch.Tensor:
        """Each module's error at R = 0 .. R_max (G, R_max + 1) on the distance's scale."""
        G, K, r, k = stack.A.shape
        d = stack.B.shape[2]
        top = useful_rank(d, k, r, K, config.core)
        curve = rank_curves(stack.A, stack.scaled_B, config.core, top)
        return curve_for_distance(curve, d, k, config.distance)

    def plan_modules(
        self,
        config: SharedBasisConfig,
        modules: Sequence[ModuleSpec],
        num_tasks: int,
        surveys: dict[str, torch.Tensor] | None,
    ) -> dict[str, SharedBasisConfig] | None:
        """A rank: checked against every module, one config for all (None). A budget: R per
        module from the curves, as configs with that rank."""
        if config.rank is not None:
            for spec in modules:
                check_rank(config.rank, spec)
            return None
        assert surveys is not None and config.budget is not None  # needs_survey said so
        budget = budget_params([m.shape_key for m in modules], num_tasks, config.budget)
        try:
            alloc = allocate_ranks(
                [surveys[m.name] for m in modules],
                [(m.d, m.k) for m in modules],
                num_tasks,
                budget,
                config.core,
            )
        except ValueError as e:  # below R = 1 everywhere: say it in percent too
            floor = sum(basis_params(m.d, m.k, num_tasks, 1, config.core) for m in modules)
            full = sum(num_tasks * m.r * (m.d + m.k) for m in modules)
            raise HydraoptError(
                f"--budget {config.budget:g} % is below the smallest shared basis "
                f"({100.0 * floor / full:.2f} %: R = 1 in every module); {e}"
            ) from None
        return {
            spec.name: dataclasses.replace(config, rank=R, budget=None)
            for spec, R in zip(modules, alloc.ranks, strict=True)
        }

    def merge(
        self,
        stack: LoraStack,
        config: SharedBasisConfig,
        *,
        generator: torch.Generator,
        context: MergeContext,
    ) -> MergedBasisResult:
        """U, V and the cores of G modules at the config's rank (closed form, refinement)."""
        G, K, r, k = stack.A.shape
        method_heads(self, config, K)
        if config.rank is None:
            raise HydraoptError(
                "a shared_basis budget is spent across modules by the engine "
                "(hydraopt.merge_adapter_set); a direct merge call needs a rank"
            )
        d = stack.B.shape[2]
        check_rank(config.rank, ModuleSpec("(this group)", d, k, r))
        out = fit_shared_basis(
            stack.A,
            stack.scaled_B,
            config.rank,
            core=config.core,
            sweeps=config.sweeps,
            sweep_tol=config.sweep_tol,
            cp_sweeps=config.cp_sweeps,
            distance=config.distance,
            refine_steps=config.refine_steps,
            refine_lr=config.refine_lr,
        )
        return MergedBasisResult(out.U, out.V, out.cores, out.measured)

    def merge_vera(
        self, stack: VeraStack, config: Any, *, generator: torch.Generator, context: MergeContext
    ) -> MergedVeraStack:
        """Never called: ``vera_config_class = None`` makes the VeRA kind refuse the method."""
        raise HydraoptError("shared_basis merges LoRA adapters only")
