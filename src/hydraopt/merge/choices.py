"""The named choices of the merge configs (``Literal`` types and their values).

Torch-free, like the configs that use them (:mod:`~hydraopt.merge.classic_config`,
:mod:`~hydraopt.merge.hydraopt_config`): the CLI builds its flags from the configs without
importing torch. The functions that implement each choice live in :mod:`~hydraopt.merge.distances`,
:mod:`~hydraopt.merge.sparsify` and :mod:`~hydraopt.merge.consensus`.
"""

from __future__ import annotations

from typing import Literal

# f(ΔW, ΔW'): the paper's default mean absolute error and its ablation's alternatives.
Distance = Literal["mae", "mse", "fro", "cos"]
DISTANCES: tuple[str, ...] = ("mae", "mse", "fro", "cos")

# How the classic merges thin each task tensor (TIES / DARE) and combine the K of them.
Sparsify = Literal["none", "magnitude", "random"]
Consensus = Literal["sum", "ties"]
MajoritySign = Literal["total", "frequency"]
