"""The classic data-free merges, composed as sparsify x consensus (mergekit's view).

=================== =========== ========= ===============
name                sparsify    consensus default weights
=================== =========== ========= ===============
task_arithmetic     none        sum       uniform (1/K)
magnitude_prune     magnitude   sum       uniform (1/K)
ties                magnitude   ties      unary (1)
dare_linear         random      sum       uniform (1/K)
dare_ties           random      ties      unary (1)
=================== =========== ========= ===============

The default weights follow the HydraOpt paper (appendix A.1: "uniform merging coefficients for TA
and DARE, unary for TIES and DARE-TIES").

Full merges work in *factor space* exactly like PEFT's ``add_weighted_adapter`` for same-rank
adapters: A and B are merged separately, with sqrt(|w_i s_i|) on each side (the sign on A), so
the result has scale 1. This is the method users compare against; its cross terms
(B_i A_j for i != j) are why it loses quality. Each ``<name>_a_only`` variant (the paper's Fig. 6)
merges only the A's with unscaled weights and keeps every task's own B_i (scale folded in), at
the storage of HydraOpt with M = K.

VeRA adapters (``merge_vera``) merge their two vectors the same way: λd plays A (it starts random
and takes the sign) and λb plays B (it starts at zero); VeRA has no scale, so each side gets
sqrt(|w_i|). ``<name>_a_only`` merges only λd and keeps every task's λb.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from hydraopt.errors import HydraoptError
from hydraopt.merge.base import MergeContext, method_heads, select_fields
from hydraopt.merge.choices import Consensus, Sparsify
from hydraopt.merge.classic_config import (
    A_ONLY_METHODS,
    CLASSIC,
    CLASSIC_METHODS,
    ClassicConfig,
    DefaultWeight,
)
from hydraopt.merge.consensus import combine
from hydraopt.merge.registry import register
from hydraopt.merge.sparsify import sparsify

# The names and the config live torch-free in classic_config; importable from here as before.
__all__ = ["A_ONLY_METHODS", "CLASSIC_METHODS", "ClassicConfig", "GeneralizedTaskArithmetic"]
from hydraopt.types import LoraStack, MergedStack, MergedVeraStack, VeraStack


class GeneralizedTaskArithmetic:
    """One sparsify x consensus merge, full (M = 1) or A-only (M = K)."""

    config_class: ClassVar[type] = ClassicConfig
    space: ClassVar[str] = "factors"
    vera_config_class: ClassVar[type | None] = ClassicConfig
    takes_heads: ClassVar[bool] = False
    name: str

    def __init__(
        self,
        sparsify_method: Sparsify,
        consensus: Consensus,
        default_weight: DefaultWeight,
        a_only: bool,
    ) -> None:
        self.sparsify_method = sparsify_method
        self.consensus = consensus
        self.default_weight = default_weight
        self.a_only = a_only

    def num_heads(self, config: ClassicConfig, num_tasks: int) -> int:
        return num_tasks if self.a_only else 1

    def label(self, num_heads: int) -> str:
        return self.name

    def applied_config(
        self, config: ClassicConfig, num_tasks: int, device: str = "cpu"
    ) -> dict[str, Any]:
        """The weights (the method's default worked out for K), and ``density`` /
        ``majority_sign_method`` where a sparsification / TIES' sign election runs; ``heads``
        only checks M and is left out."""
        used = {"weights"}
        if self.sparsify_method != "none":
            used.add("density")
        if self.consensus == "ties":
            used.add("majority_sign_method")
        if config.weights is not None:
            weights = list(config.weights)
        else:
            weights = [1.0 / num_tasks if self.default_weight == "uniform" else 1.0] * num_tasks
        return select_fields(config, used, weights=weights)

    def task_weights(self, config: ClassicConfig, num_tasks: int) -> torch.Tensor:
        """(K,) coefficients: the given ones, or the method's default."""
        if config.weights is not None:
            if len(config.weights) != num_tasks:
                raise HydraoptError(f"{len(config.weights)} weights given for {num_tasks} adapters")
            return torch.tensor(config.weights, dtype=torch.float32)
        fill = 1.0 / num_tasks if self.default_weight == "uniform" else 1.0
        return torch.full((num_tasks,), fill)

    def merge(
        self,
        stack: LoraStack,
        config: ClassicConfig,
        *,
        generator: torch.Generator,
        context: MergeContext,
    ) -> MergedStack:
        G, K, r, k = stack.A.shape
        d = stack.B.shape[2]
        method_heads(self, config, K)
        w = self.task_weights(config, K).to(stack.A.device)  # (K,)

        def merge_factor(t: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
            return self.merge_tensors(t.flatten(2), weights, config, generator)

        if self.a_only:
            a = merge_factor(stack.A, w.expand(G, K)).view(G, r, k)
            heads = stack.scaled_B  # (G, K, d, r): every task keeps its own B
            routing = torch.arange(K, device=heads.device).expand(G, K)
            return MergedStack(a, heads, routing.clone())

        ws = w * stack.scale  # (G, K)
        root = ws.abs().sqrt()
        w_a = root * torch.where(ws >= 0, 1.0, -1.0)  # sign on A only, so it is not squared away
        # A first, then B, as PEFT does; the generator's stream order matters for DARE.
        a = merge_factor(stack.A, w_a).view(G, r, k)
        b = merge_factor(stack.B, root).view(G, d, r)
        routing = torch.zeros(G, K, dtype=torch.long, device=a.device)
        return MergedStack(a, b.unsqueeze(1), routing)

    def merge_tensors(
        self,
        tensors: torch.Tensor,
        weights: torch.Tensor,
        config: ClassicConfig,
        generator: torch.Generator,
    ) -> torch.Tensor:
        """Sparsify then combine (G, K, n) task tensors with weights (G, K) -> (G, n)."""
        pruned = sparsify(tensors, self.sparsify_method, config.density, generator)
        return combine(pruned, weights, self.consensus, config.majority_sign_method)

    def merge_vera(
        self,
        stack: VeraStack,
        config: ClassicConfig,
        *,
        generator: torch.Generator,
        context: MergeContext,
    ) -> MergedVeraStack:
        """λd and λb merged separately (see module doc): M = 1, or M = K λb rows for A-only."""
        G, K, _ = stack.lambda_b.shape
        method_heads(self, config, K)
        w = self.task_weights(config, K).to(stack.lambda_b.device).expand(G, K)  # (G, K)
        if self.a_only:
            lam_d = self.merge_tensors(stack.lambda_d, w, config, generator)  # (G, r)
            routing = torch.arange(K, device=lam_d.device).expand(G, K).clone()
            return MergedVeraStack(stack.lambda_b, lam_d[:, None], routing)
        root = w.abs().sqrt()
        w_d = root * torch.where(w >= 0, 1.0, -1.0)  # the sign on λd only, as on LoRA's A
        # λd first, then λb (A before B for LoRA): the generator's stream order matters for DARE.
        lam_d = self.merge_tensors(stack.lambda_d, w_d, config, generator)  # (G, r)
        lam_b = self.merge_tensors(stack.lambda_b, root, config, generator)  # (G, d)
        routing = torch.zeros(G, K, dtype=torch.long, device=lam_b.device)
        return MergedVeraStack(lam_b[:, None], lam_d[:, None], routing)


# Full merges first, then the A-only variants: the order of CLI choices and sweep baselines.
for _a_only in (False, True):
    for _name, (_sp, _co, _w) in CLASSIC.items():
        _method = GeneralizedTaskArithmetic(_sp, _co, _w, _a_only)
        _method.name = f"{_name}_a_only" if _a_only else _name
        register(_method.name, _method)
