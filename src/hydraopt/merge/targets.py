"""The refinement's targets ΔW_i: dense, or kept as factors and formed a few tasks at a time."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class FactorTargets:
    """The updates ΔW_i = (s B)_i A_i kept as factors, formed a few tasks at a time.

    Stands in for the dense (G, K, d, k) targets when K is large, so that memory stays
    O(tasks per block x d x k) however many adapters there are.

    Attributes:
        A: (G, K, r, k); scaled_B: (G, K, d, r), LoRA scale folded in.
    """

    A: torch.Tensor
    scaled_B: torch.Tensor

    @property
    def shape(self) -> torch.Size:
        G, K, _, k = self.A.shape
        return torch.Size((G, K, self.scaled_B.shape[2], k))

    @property
    def dtype(self) -> torch.dtype:
        return self.A.dtype

    def take(self, tasks: slice | torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Dense ΔW of the selected tasks, (G, n, d, k), in ``dtype`` (default: the factors').

        A low ``dtype`` runs the product itself in it (bfloat16 GEMMs accumulate in float32 and
        round once, like casting the float32 product): twice the speed, half the bytes written.
        """
        b, a = self.scaled_B[:, tasks], self.A[:, tasks]
        if dtype is not None:
            b, a = b.to(dtype), a.to(dtype)
        return b @ a


Targets = torch.Tensor | FactorTargets


def take_targets(
    targets: Targets, tasks: slice | torch.Tensor, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """Dense (G, n, d, k) targets of the selected tasks, from either form, in ``dtype``."""
    if isinstance(targets, torch.Tensor):
        picked = targets[:, tasks]
        return picked if dtype is None else picked.to(dtype)
    return targets.take(tasks, dtype)
