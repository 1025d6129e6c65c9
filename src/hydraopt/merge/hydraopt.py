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

from typing import Any, ClassVar

import torch

from hydraopt.devices import resolve_precision
from hydraopt.kinds.vera.config import VeraHydraOptConfig
from hydraopt.merge.base import MergeContext, method_heads, select_fields
from hydraopt.merge.closed_form import projected_heads, routed_heads
from hydraopt.merge.head_scales import fit_head_scales
from hydraopt.merge.hydraopt_config import HydraOptConfig
from hydraopt.merge.median_start import median_start
from hydraopt.merge.paper import paper_solve
from hydraopt.merge.refine import refine_measured
from hydraopt.merge.registry import registered
from hydraopt.merge.routing import best_routing
from hydraopt.merge.targets import FactorTargets, Targets, take_targets
from hydraopt.types import LoraStack, Measured, MergedStack, MergedVeraStack, VeraStack

# The config lives torch-free in hydraopt_config; importable from here as before.
__all__ = ["PAPER_FIELDS", "HydraOpt", "HydraOptConfig"]

# What the paper solver reads; the other fields are the fast solver's.
PAPER_FIELDS = {
    "heads",
    "distance",
    "solver",
    "epochs",
    "lr",
    "weight_decay",
    "temperature",
    "head_scale",
}


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
        self, config: HydraOptConfig, num_tasks: int, device: str = "cpu"
    ) -> dict[str, Any]:
        """The fields the chosen solver reads for K = ``num_tasks``, the refinement schedule
        worked out (see :meth:`merge`: M = 1 and M = K route without a search, so ``restarts``
        is unused there; ``mse`` skips the refinement, so its fields are unused)."""
        if config.solver == "paper":
            scale = config.resolved_head_scale(num_tasks)
            return select_fields(config, PAPER_FIELDS, head_scale=scale)
        # The schedule depends on the precision path the merge's device takes (issue 22).
        precision = resolve_precision(config.refine_precision, torch.device(device))
        steps, lr = config.refine_schedule(num_tasks, precision)
        resolved = {
            "refine_precision": precision,
            "head_scale": config.resolved_head_scale(num_tasks),
        }
        return _applied_fast(config, num_tasks, steps, lr, resolved)

    def applied_vera_config(self, config: VeraHydraOptConfig, num_tasks: int) -> dict[str, Any]:
        """:meth:`applied_config` for VeRA adapters (the kind calls it): the set schedule."""
        return _applied_fast(config, num_tasks, config.refine_steps, config.refine_lr, {})

    def merge(
        self,
        stack: LoraStack,
        config: HydraOptConfig,
        *,
        generator: torch.Generator,
        context: MergeContext,
    ) -> MergedStack:
        K = stack.A.shape[1]
        scale = config.resolved_head_scale(K)
        merged, scaled = self._solve(
            stack, config, generator=generator, context=context, head_scale=scale
        )
        if scale == 1.0:
            return merged
        # Head-magnitude calibration: the errors change with it. Many adapters (targets kept as
        # factors): the refinement's closing pass measured the scaled result too (the same
        # call on the same factors as the engine's, so the same numbers; a pass of its own was a
        # fifth of an M = 1 merge at K = 1,000). Otherwise the engine measures it.
        return MergedStack(merged.A, merged.heads * scale, merged.routing, scaled)

    def _solve(
        self,
        stack: LoraStack,
        config: HydraOptConfig,
        *,
        generator: torch.Generator,
        context: MergeContext,
        head_scale: float = 1.0,
    ) -> tuple[MergedStack, Measured | None]:
        """The solved merge before the head scale, and (where the refinement measured them in
        its closing pass) the errors of its heads times ``head_scale``."""
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
            return MergedStack(a, heads, routing), None

        scaled_b = stack.scaled_B
        routing, a, _ = best_routing(
            stack.A, scaled_b, M, generator=generator, restarts=config.restarts
        )
        heads = routed_heads(projected_heads(stack.A, scaled_b, a), routing, M)
        # The closed form is exact for squared Frobenius (= mse up to a constant): refining could
        # only move it by rounding, so skip it there.
        precision = resolve_precision(config.refine_precision, a.device)
        steps, lr = config.refine_schedule(K, precision)
        if steps > 0 and config.distance != "mse":
            every_task = config.refine_tasks >= K
            # Many adapters: keep the targets as factors (memory flat in K); cos needs them dense.
            dense = stack.delta() if every_task or config.distance == "cos" else None
            delta: Targets = dense if dense is not None else FactorTargets(stack.A, scaled_b)
            # Medians cost a sort over the tasks: only where the refinement sees every task.
            if config.distance == "mae" and config.start == "auto" and dense is not None:
                a, heads = median_start(dense, stack.A, a, heads, routing)
            a, heads, measured, scaled = refine_measured(
                delta,
                a,
                heads,
                routing,
                distance=config.distance,
                steps=steps,
                lr=lr,
                precision=precision,
                tasks_per_step=config.refine_tasks,
                generator=generator,
                momentum=config.refine_momentum(K, precision),
                head_scale=head_scale if config.distance != "cos" else 1.0,
            )
            if config.distance == "cos":
                heads = fit_head_scales(take_targets(delta, slice(None)), a, heads, routing)
            else:
                # The refinement's final float32 evaluation is the result's error (with the zero
                # yardstick, from the same pass where it could): hand it on instead of having the
                # engine form the K updates again.
                return MergedStack(a, heads, routing, measured), scaled
        return MergedStack(a, heads, routing), None

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


def _applied_fast(
    config: HydraOptConfig | VeraHydraOptConfig,
    num_tasks: int,
    steps: int,
    lr: float,
    resolved: dict[str, Any],
) -> dict[str, Any]:
    """The fast solver's fields that apply for K = ``num_tasks``, ``steps`` and ``lr`` of the
    refinement resolved (and ``resolved``'s other fields)."""
    # solver, head_scale: LoRA; shared: VeRA
    used = {"heads", "distance", "solver", "shared", "head_scale"}
    if 1 < config.heads < num_tasks:
        used.add("restarts")
    if config.distance != "mse":
        used.add("refine_steps")
        if steps > 0:
            used |= {"refine_lr", "refine_precision", "refine_tasks"}  # the last two: LoRA
            # The median start needs the dense targets, formed only when every task is seen.
            if config.distance == "mae" and getattr(config, "refine_tasks", 0) >= num_tasks:
                used.add("start")
    return select_fields(config, used, refine_steps=steps, refine_lr=lr, **resolved)
