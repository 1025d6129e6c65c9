"""The batched tensors a merge method reads and returns, for G same-shaped modules of K adapters.

Tensors are batched over a leading group axis G (same-shaped modules merged together), then the
task axis K. Scales are kept separate from the factors so that each method can decide how to use
them (HydraOpt folds them into B; PEFT's classic merges split sqrt(w * s) over A and B).
Importable from :mod:`hydraopt.types` as before.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Protocol

import torch

from hydraopt.results import LoraRecord, MergedModule


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
        measured: errors the method already measured on the way (its final evaluation), so the
            engine need not form the K updates again to report them; None if it measured none.
    """

    A: torch.Tensor
    heads: torch.Tensor
    routing: torch.Tensor
    measured: Measured | None = None

    # The per-module record a bundle keeps (built from one module's slice of ``stored()``).
    record_type: ClassVar[type[LoraRecord]] = MergedModule

    def stored(self) -> tuple[torch.Tensor, ...]:
        """The bundle tensors, G-batched, routing last: (A', heads, routing)."""
        return (self.A, self.heads, self.routing)

    def delta(self) -> torch.Tensor:
        """Dense routed updates, (G, K, d, k)."""
        g_idx = torch.arange(self.heads.shape[0], device=self.heads.device)[:, None]
        routed = self.heads[g_idx, self.routing]  # (G, K, d, r)
        return routed @ self.A[:, None]


class MergeOutput(Protocol):
    """What a merge method returns for G modules, as the engine reads it: the LoRA form (A',
    heads, routing) for errors and serving, ``stored()`` and ``record_type`` for the bundle.

    :class:`MergedStack` for most methods; ``shared_basis`` returns its U, V and cores.
    """

    record_type: ClassVar[type[LoraRecord]]

    @property
    def A(self) -> torch.Tensor: ...  # (G, r, k)

    @property
    def heads(self) -> torch.Tensor: ...  # (G, M, d, r)

    @property
    def routing(self) -> torch.Tensor: ...  # (G, K)

    @property
    def measured(self) -> Measured | None: ...

    def stored(self) -> tuple[torch.Tensor, ...]: ...


@dataclass(frozen=True)
class Measured:
    """Per-task errors of a merge result, measured by the method with one distance.

    Attributes:
        distance: registry name of f.
        error: (G, K) f(ΔW_i, ΔW'_i), the hard-routed error of the returned result.
        zero: (G, K) f(ΔW_i, 0), the error of storing nothing.
    """

    distance: str
    error: torch.Tensor
    zero: torch.Tensor


@dataclass(frozen=True)
class VeraStack:
    """K VeRA adapters' trained vectors for G same-shaped modules, with the frozen projections.

    VeRA (Kopiczko et al., ICLR 2024) updates a module by ΔW = diag(λb) B diag(λd) A, where A and B
    are random projections shared by every module and task (PEFT stores one ``vera_A`` (r, max_in)
    and ``vera_B`` (max_out, r); a module uses the slices A[:, :k] and B[:d, :]) and only the
    vectors λb (d) and λd (r) are trained per module. There is no scale factor.

    Attributes:
        lambda_b: (G, K, d) float32.
        lambda_d: (G, K, r) float32.
        A: (r, k) the module's slice of ``vera_A`` (the same for every module of the group).
        B: (d, r) the module's slice of ``vera_B``.
    """

    lambda_b: torch.Tensor
    lambda_d: torch.Tensor
    A: torch.Tensor
    B: torch.Tensor

    def delta(self) -> torch.Tensor:
        """Dense updates ΔW, (G, K, d, k). Only for small shapes, tests and refinement."""
        left = self.lambda_b[..., :, None] * self.B  # (G, K, d, r)
        right = self.lambda_d[..., :, None] * self.A  # (G, K, r, k)
        return left @ right

    def to(self, device: torch.device | str) -> VeraStack:
        return VeraStack(
            self.lambda_b.to(device), self.lambda_d.to(device), self.A.to(device), self.B.to(device)
        )


@dataclass(frozen=True)
class MergedVeraStack:
    """The result of a VeRA merge for G same-shaped modules.

    One of the two vectors has a single row per module (shared by every task); the other has M
    rows and ``routing`` names the row each task uses. With M = 1 both have one row.

    Attributes:
        lambda_b: (G, Mb, d).
        lambda_d: (G, Md, r); Mb == 1 or Md == 1.
        routing: (G, K) int64 index into the side with M rows (all zeros when M = 1).
    """

    lambda_b: torch.Tensor
    lambda_d: torch.Tensor
    routing: torch.Tensor

    def routed(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Each task's (λb (G, K, d), λd (G, K, r))."""
        g_idx = torch.arange(self.routing.shape[0], device=self.routing.device)[:, None]
        zeros = torch.zeros_like(self.routing)
        b_idx = self.routing if self.lambda_b.shape[1] > 1 else zeros
        d_idx = self.routing if self.lambda_d.shape[1] > 1 else zeros
        return self.lambda_b[g_idx, b_idx], self.lambda_d[g_idx, d_idx]

    def as_lora(self, A: torch.Tensor, B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The same updates as (A' (G, r, k), heads (G, M, d, r)) with ΔW'_i = heads[route(i)] @ A'.

        Lets LoRA-space tools (hard-routed errors) measure a VeRA merge without a second copy.
        """
        if self.lambda_d.shape[1] == 1:  # λd shared: it folds into A', λb rows make the heads
            a = self.lambda_d[:, 0, :, None] * A  # (G, r, k)
            return a, self.lambda_b[..., :, None] * B  # (G, Mb, d, r)
        a = A.expand(self.lambda_b.shape[0], *A.shape)  # (G, r, k)
        heads = self.lambda_b[:, :, :, None] * B * self.lambda_d[:, :, None, :]  # (G, Md, d, r)
        return a, heads

    def to(self, device: torch.device | str) -> MergedVeraStack:
        return MergedVeraStack(
            self.lambda_b.to(device), self.lambda_d.to(device), self.routing.to(device)
        )
