"""How alike K VeRA adapters' vectors are: the VeRA version of the paper's Fig. 2.

The paper's argument for sharing λd (Sec. 5, "Different low-rank-based adapter types"): λd starts
from the same values in every task (PEFT: the constant ``d_initial``) and λb from zero, as
LoRA's A and B; if training moves λd little, one shared λd costs little.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from hydraopt.kinds.vera.config import SHARED_SIDES
from hydraopt.kinds.vera.load import VeraAdapterSet
from hydraopt.types import ModuleSpec


def vector_similarity(
    aset: VeraAdapterSet, modules: Sequence[ModuleSpec] | None = None
) -> dict[str, torch.Tensor]:
    """(K, K) mean over modules of mean |x_i - x_j| for x = λd and λb, absolute and relative.

    Returns:
        ``{"lambda_d", "lambda_b", "lambda_d_relative", "lambda_b_relative"}``; relative = divided
        by the mean |x| of the pair, the only numbers that compare λd with λb.
    """
    specs = list(modules) if modules is not None else list(aset.modules)
    K = len(aset.tasks)
    sums = {
        f"{key}{suffix}": torch.zeros(K, K, dtype=torch.float64)
        for key in SHARED_SIDES
        for suffix in ("", "_relative")
    }
    for spec in specs:
        stack = aset.load_stack([spec])
        for key, t in (("lambda_d", stack.lambda_d[0]), ("lambda_b", stack.lambda_b[0])):
            flat = t.to(torch.float64)  # (K, n)
            diff = (flat[:, None, :] - flat[None, :, :]).abs().mean(-1)  # (K, K)
            size = flat.abs().mean(-1)  # (K,)
            sums[key] += diff
            sums[f"{key}_relative"] += diff / ((size[:, None] + size[None, :]) / 2).clamp_min(1e-30)
    return {k: v / max(1, len(specs)) for k, v in sums.items()}
