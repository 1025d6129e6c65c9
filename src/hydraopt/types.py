"""Core value types shared by io/, merge/ and the engine.

Tensors are batched over a leading group axis G (same-shaped modules merged together), then the
task axis K. Scales are kept separate from the factors so that each method can decide how to use
them (HydraOpt folds them into B; PEFT's classic merges split sqrt(w * s) over A and B).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch


@dataclass(frozen=True)
class ModuleSpec:
    """One adapted linear module, e.g. ``model.layers.7.self_attn.q_proj``.

    Attributes:
        name: module path inside the base model (PEFT's key without prefix and suffix).
        d: output features (rows of B and of ΔW).
        k: input features (columns of A and of ΔW).
        r: LoRA rank of this module (same for every adapter, validated on load).
    """

    name: str
    d: int
    k: int
    r: int

    @property
    def shape_key(self) -> tuple[int, int, int]:
        """Modules with equal keys can be stacked into one batch."""
        return (self.d, self.k, self.r)


@dataclass(frozen=True)
class LoraStack:
    """K adapters' factors for G same-shaped modules.

    Attributes:
        A: (G, K, r, k) float32.
        B: (G, K, d, r) float32, *without* the LoRA scale.
        scale: (G, K) float32, ΔW_gi = scale_gi * B_gi @ A_gi.
    """

    A: torch.Tensor
    B: torch.Tensor
    scale: torch.Tensor

    @property
    def scaled_B(self) -> torch.Tensor:
        """B with the scale folded in, (G, K, d, r)."""
        return self.B * self.scale[:, :, None, None]

    def delta(self) -> torch.Tensor:
        """Dense updates ΔW, (G, K, d, k). Only for small shapes, tests and refinement."""
        return self.scaled_B @ self.A

    def to(self, device: torch.device | str) -> LoraStack:
        return LoraStack(self.A.to(device), self.B.to(device), self.scale.to(device))


@dataclass(frozen=True)
class MergedStack:
    """The result of a merge for G same-shaped modules.

    Every method returns this shape: one shared A', M heads (scale folded in) and a routing table
    that names the head each task uses in each module. Classic merges have M = 1 and route every
    task to head 0; "A-only" merges have M = K and the identity routing.

    Attributes:
        A: (G, r, k) shared A'.
        heads: (G, M, d, r) the B' heads, LoRA scale folded in (ΔW'_gi = heads[g, routing[g, i]] @ A[g]).
        routing: (G, K) int64 head index per module and task.
    """

    A: torch.Tensor
    heads: torch.Tensor
    routing: torch.Tensor

    def delta(self) -> torch.Tensor:
        """Dense routed updates, (G, K, d, k)."""
        g_idx = torch.arange(self.heads.shape[0], device=self.heads.device)[:, None]
        routed = self.heads[g_idx, self.routing]  # (G, K, d, r)
        return routed @ self.A[:, None]

    def to(self, device: torch.device | str) -> MergedStack:
        return MergedStack(self.A.to(device), self.heads.to(device), self.routing.to(device))


@dataclass(frozen=True)
class AdapterInfo:
    """One input adapter as found on disk.

    Attributes:
        task: task name (the directory name unless given).
        path: adapter directory.
        config: the raw ``adapter_config.json`` (kept verbatim so export can reuse it).
        weights_file: the tensor file inside ``path``.
    """

    task: str
    path: Path
    config: dict[str, Any]
    weights_file: Path


@dataclass(frozen=True)
class Bundle:
    """A merged set of adapters: shared A' per module, heads, routing and provenance.

    Attributes:
        method: registry name of the merge method.
        config: the method's resolved config as a plain dict.
        tasks: task names, in routing order.
        base_model: ``base_model_name_or_path`` shared by every input adapter.
        modules: the adapted modules, in a stable order.
        merged: module name -> (A' (r, k), heads (M, d, r), routing (K,)).
        adapter_configs: task -> original ``adapter_config.json`` (for export).
        scales: task -> module -> the original LoRA scale (export divides heads by it).
        storage: parameter accounting (see :mod:`hydraopt.storage`).
        extra: free-form metadata (seed, library version, timings, errors).
    """

    method: str
    config: dict[str, Any]
    tasks: tuple[str, ...]
    base_model: str
    modules: tuple[ModuleSpec, ...]
    merged: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    adapter_configs: dict[str, dict[str, Any]]
    scales: dict[str, dict[str, float]]
    storage: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def num_heads(self) -> int:
        """Largest number of heads over modules (every module has the same M for our methods)."""
        return max(int(h.shape[0]) for _, h, _ in self.merged.values())

    def task_factors(self, task: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """The routed (A', B') of one task per module, scale folded into B'."""
        i = self.tasks.index(task)
        return {
            name: (a, heads[int(routing[i])]) for name, (a, heads, routing) in self.merged.items()
        }
