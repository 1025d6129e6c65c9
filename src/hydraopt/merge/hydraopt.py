"""HydraOpt (Ceritli et al., arXiv 2507.17706): one shared A' and M <= K heads per module.

Two solvers behind the one registered method:

- ``fast`` (default): the exact closed form for the squared Frobenius distance (computed from the
  factors, see :mod:`closed_form`), hard routing by alternating k-means / closed form for M < K
  (:mod:`routing`), then AdamW refinement of the *hard-routed* error on the chosen distance
  (:mod:`refine`). Hard routing is what gets deployed, so it is what is optimised.
- ``paper``: the paper's algorithm as published (soft routing, AdamW, 1000 epochs; :mod:`paper`).
  Kept as a faithful reference and for comparisons.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch

from hydraopt.errors import HydraoptError
from hydraopt.kinds.vera.config import VeraHydraOptConfig
from hydraopt.merge.base import MergeContext, check_heads, method_heads, select_fields
from hydraopt.merge.closed_form import projected_heads, routed_heads
from hydraopt.merge.distances import DISTANCES, Distance
from hydraopt.merge.median_start import median_start
from hydraopt.merge.paper import paper_solve
from hydraopt.merge.refine import (
    FactorTargets,
    Targets,
    distance_to_zero,
    fit_head_scales,
    refine,
    resolve_precision,
    take_targets,
)
from hydraopt.merge.registry import registered
from hydraopt.merge.routing import best_routing
from hydraopt.types import LoraStack, Measured, MergedStack, MergedVeraStack, VeraStack

# Default refinement schedules (see HydraOptConfig.refine_schedule).
SHARED_HEAD_STEPS, SHARED_HEAD_LR = 100, 1.0  # M < K
OWN_HEAD_STEPS, OWN_HEAD_LR = 20, 0.05  # M = K
# What the paper solver reads; the other fields are the fast solver's.
PAPER_FIELDS = {"heads", "distance", "solver", "epochs", "lr", "weight_decay", "temperature"}


@dataclass(frozen=True)
class HydraOptConfig:
    """Options of HydraOpt.

    Attributes:
        heads: M, number of B' heads per module (1 <= M <= K).
        distance: f, the distance minimised: ``mae`` (paper default), ``mse``, ``fro`` or ``cos``.
        solver: ``fast`` (closed form + hard routing + refinement) or ``paper``.
        epochs: paper solver: AdamW steps (paper: 1000).
        lr: paper solver: learning rate (paper: 0.01).
        weight_decay: paper solver: AdamW weight decay (torch's default, as the paper's code).
        temperature: paper solver: T in softmax(C'/T); 0.2 here = the appendix code's T = 5.
        restarts: fast solver: k-means++ starts for the routing (M < K).
        refine_steps: fast solver: AdamW steps on the hard-routed distance, 0 = closed form only
            (default 100 for M < K, 20 for M = K, see :meth:`refine_schedule`; VeRA: 100).
        refine_lr: fast solver: learning rate relative to the factors' RMS (default 1.0 for
            M < K, 0.05 for M = K; VeRA: 0.05).
        refine_precision: fast solver: dtype of the refinement's dense products; ``auto`` =
            bfloat16 where it is fast (AVX-512 BF16 / AMX CPUs, CUDA), else float32.
        refine_tasks: fast solver: tasks per refinement step; with more adapters than this each
            step samples them, so a step's cost does not grow with K.
        start: fast solver, MAE only: ``auto`` starts the refinement from the better of the
            closed form and the low-rank fit of per-head medians (:mod:`median_start`) when
            K <= refine_tasks; ``closed_form`` always starts from the closed form.
    """

    heads: int
    distance: Distance = "mae"
    solver: Literal["fast", "paper"] = "fast"
    epochs: int = 1000
    lr: float = 0.01
    weight_decay: float = 0.01
    temperature: float = 0.2
    restarts: int = 8
    refine_steps: int | None = None
    refine_lr: float | None = None
    refine_precision: Literal["auto", "float32", "bfloat16"] = "auto"
    refine_tasks: int = 8
    start: Literal["auto", "closed_form"] = "auto"

    def __post_init__(self) -> None:
        check_heads(self.heads)
        if self.distance not in DISTANCES:
            raise HydraoptError(f"distance must be one of {DISTANCES}, got {self.distance!r}")
        if self.solver not in ("fast", "paper"):
            raise HydraoptError(f"solver must be 'fast' or 'paper', got {self.solver!r}")
        if self.temperature <= 0:
            raise HydraoptError("temperature must be > 0")
        if self.epochs < 0 or (self.refine_steps or 0) < 0 or self.restarts < 1:
            raise HydraoptError("epochs and refine_steps must be >= 0 and restarts >= 1")
        if self.refine_lr is not None and not self.refine_lr > 0:
            raise HydraoptError(f"refine_lr must be > 0, got {self.refine_lr}")
        if self.refine_precision not in ("auto", "float32", "bfloat16"):
            raise HydraoptError("refine_precision must be auto, float32 or bfloat16")
        if self.refine_tasks < 1:
            raise HydraoptError("refine_tasks must be >= 1")
        if self.start not in ("auto", "closed_form"):
            raise HydraoptError("start must be 'auto' or 'closed_form'")

    def refine_schedule(self, num_tasks: int) -> tuple[int, float]:
        """(steps, lr) of the refinement for K = ``num_tasks``: the set fields, else the defaults.

        M < K: heads are compromises between the tasks routed to them and the closed form is
        the squared-error optimum, so 100 steps at lr 1.0 are worth their cost (1-2 % MAE).
        M = K: every task keeps its own head and the start is within ~3 % of the refined MAE;
        large steps only throw that start away (real adapters: no gain in 20 steps at
        lr >= 0.2), while 20 steps at 0.05 keep 75-90 % of 100 steps' gain at a fifth of the
        cost (benchmarks/RESULTS.md, section 2).
        """
        own_heads = self.heads >= num_tasks
        steps = self.refine_steps
        if steps is None:
            steps = OWN_HEAD_STEPS if own_heads else SHARED_HEAD_STEPS
        lr = self.refine_lr
        if lr is None:
            lr = OWN_HEAD_LR if own_heads else SHARED_HEAD_LR
        return steps, lr


@registered("hydraopt")
class HydraOpt:
    """The registered HydraOpt method (see module doc)."""

    config_class: ClassVar[type] = HydraOptConfig
    space: ClassVar[str] = "delta"
    vera_config_class: ClassVar[type | None] = VeraHydraOptConfig
    takes_heads: ClassVar[bool] = True
    name: ClassVar[str]

    def num_heads(self, config: HydraOptConfig, num_tasks: int) -> int:
        return config.heads

    def label(self, num_heads: int) -> str:
        return f"{self.name} M={num_heads}"

    def applied_config(
        self, config: HydraOptConfig | VeraHydraOptConfig, num_tasks: int
    ) -> dict[str, Any]:
        """The fields the chosen solver reads for K = ``num_tasks``, the refinement schedule
        worked out (see :meth:`merge`: M = 1 and M = K route without a search, so ``restarts``
        is unused there; ``mse`` skips the refinement, so its fields are unused)."""
        if isinstance(config, HydraOptConfig) and config.solver == "paper":
            return select_fields(config, PAPER_FIELDS)
        used = {"heads", "distance", "solver", "shared"}  # solver: LoRA, shared: VeRA
        if 1 < config.heads < num_tasks:
            used.add("restarts")
        if isinstance(config, VeraHydraOptConfig):
            steps, lr = config.refine_steps, config.refine_lr
        else:
            steps, lr = config.refine_schedule(num_tasks)
        if config.distance != "mse":
            used.add("refine_steps")
            if steps > 0:
                used |= {"refine_lr", "refine_precision", "refine_tasks"}  # the last two: LoRA
                # The median start needs the dense targets, formed only when every task is seen.
                if config.distance == "mae" and getattr(config, "refine_tasks", 0) >= num_tasks:
                    used.add("start")
        return select_fields(config, used, refine_steps=steps, refine_lr=lr)

    def merge(
        self,
        stack: LoraStack,
        config: HydraOptConfig,
        *,
        generator: torch.Generator,
        context: MergeContext,
    ) -> MergedStack:
        G, K, r, k = stack.A.shape
        M = method_heads(self, config, K)
        if config.solver == "paper":
            a, heads, routing = paper_solve(
                stack.delta(),
                r,
                M,
                distance=config.distance,
                epochs=config.epochs,
                lr=config.lr,
                weight_decay=config.weight_decay,
                temperature=config.temperature,
                num_factor_tensors=context.num_factor_tensors,
                generator=generator,
            )
            return MergedStack(a, heads, routing)

        scaled_b = stack.scaled_B
        routing, a, _ = best_routing(
            stack.A, scaled_b, M, generator=generator, restarts=config.restarts
        )
        heads = routed_heads(projected_heads(stack.A, scaled_b, a), routing, M)
        # The closed form is exact for squared Frobenius (= mse up to a constant): refining could
        # only move it by rounding, so skip it there.
        steps, lr = config.refine_schedule(K)
        if steps > 0 and config.distance != "mse":
            every_task = config.refine_tasks >= K
            # Many adapters: keep the targets as factors (memory flat in K); cos needs them dense.
            dense = stack.delta() if every_task or config.distance == "cos" else None
            delta: Targets = dense if dense is not None else FactorTargets(stack.A, scaled_b)
            # Medians cost a sort over the tasks: only where the refinement sees every task.
            if config.distance == "mae" and config.start == "auto" and dense is not None:
                a, heads = median_start(dense, stack.A, a, heads, routing)
            a, heads, err = refine(
                delta,
                a,
                heads,
                routing,
                distance=config.distance,
                steps=steps,
                lr=lr,
                precision=resolve_precision(config.refine_precision, a.device),
                tasks_per_step=config.refine_tasks,
                generator=generator,
            )
            if config.distance == "cos":
                heads = fit_head_scales(take_targets(delta, slice(None)), a, heads, routing)
            else:
                # The refinement's final float32 evaluation is the result's error: hand it on
                # instead of having the engine form the K updates again.
                zero = distance_to_zero(delta, config.distance)
                return MergedStack(a, heads, routing, Measured(config.distance, err, zero))
        return MergedStack(a, heads, routing)

    def merge_vera(
        self,
        stack: VeraStack,
        config: VeraHydraOptConfig,
        *,
        generator: torch.Generator,
        context: MergeContext,
    ) -> MergedVeraStack:
        """One shared VeRA vector and M heads of the other (see :mod:`hydraopt.kinds.vera.merge`)."""
        # Imported here: hydraopt.kinds.vera.merge imports this package's modules, which import this one.
        from hydraopt.kinds.vera.merge import merge_vera_hydraopt

        method_heads(self, config, stack.lambda_b.shape[1])
        return merge_vera_hydraopt(stack, config, generator=generator)
