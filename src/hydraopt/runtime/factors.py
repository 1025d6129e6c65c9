"""The one place the runtime reads a bundle: every bundle kind as shared A' + heads + routing.

Whatever a bundle stores (HydraOpt's A' and M heads, a classic merge's single head, an A-only
merge's K heads, VeRA's λ rows over frozen projections), its update of module ``n`` for task ``i``
is ``ΔW_i = heads[routing[i]] @ A'``. The runtime needs only that view, so this module is the
adapter between bundle internals and the serving layers; a new bundle kind adds a branch here
(or a ``lora_view()`` on the bundle) and nothing else in runtime/ or serve/ changes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from hydraopt.io.bundle import load_any_bundle
from hydraopt.types import Bundle, MergedVeraStack, VeraBundle


@dataclass(frozen=True)
class ModuleFactors:
    """One adapted linear module as the runtime holds it.

    Attributes:
        A: (r, k) the shared A', held once for every task.
        heads: (M, d, r) the heads, any scale folded in (ΔW_i = heads[routing[i]] @ A).
        routing: (K,) int64 head index of each task.
    """

    A: torch.Tensor
    heads: torch.Tensor
    routing: torch.Tensor

    @property
    def shape(self) -> tuple[int, int, int]:
        """(d, k, r) of the module."""
        return int(self.heads.shape[1]), int(self.A.shape[1]), int(self.A.shape[0])


@dataclass(frozen=True)
class SharedFactors:
    """A bundle reduced to what the runtime serves.

    Attributes:
        tasks: task names, in routing order.
        base_model: the bundle's ``base_model_name_or_path`` (may be a hub id or a local path).
        modules: module name (as in ``named_modules()``) -> its factors.
        kind: ``"lora"`` or ``"vera"`` (for messages and reports only).
        method: the merge method's registry name.
    """

    tasks: tuple[str, ...]
    base_model: str
    modules: dict[str, ModuleFactors]
    kind: str
    method: str

    @property
    def num_heads(self) -> int:
        return max(int(f.heads.shape[0]) for f in self.modules.values())


def shared_factors(bundle: Bundle | VeraBundle | str | Path) -> SharedFactors:
    """The runtime view of a bundle (an in-memory one or a bundle directory).

    Args:
        bundle: a :class:`Bundle`, a :class:`VeraBundle`, or the path of a bundle dir.

    Returns:
        The :class:`SharedFactors` of every module, float32.
    """
    if isinstance(bundle, (str, Path)):
        bundle = load_any_bundle(bundle)
    if isinstance(bundle, VeraBundle):
        return _vera_factors(bundle)
    modules = {
        name: ModuleFactors(a.float(), heads.float(), routing.long())
        for name, (a, heads, routing) in bundle.merged.items()
    }
    return SharedFactors(bundle.tasks, bundle.base_model, modules, "lora", bundle.method)


def _vera_factors(bundle: VeraBundle) -> SharedFactors:
    # A module uses the slices vera_A[:, :k] and vera_B[:d, :] of PEFT's shared projections;
    # as_lora folds the shared λ side into A' (or keeps A' = the slice), exactly as in the merge.
    vera_a, vera_b = bundle.projections  # (r, max_in), (max_out, r)
    modules = {}
    for spec in bundle.modules:
        lam_b, lam_d, routing = bundle.merged[spec.name]
        stack = MergedVeraStack(lam_b.float()[None], lam_d.float()[None], routing[None])
        a, heads = stack.as_lora(vera_a[:, : spec.k].float(), vera_b[: spec.d, :].float())
        modules[spec.name] = ModuleFactors(a[0].contiguous(), heads[0].contiguous(), routing.long())
    return SharedFactors(bundle.tasks, bundle.base_model, modules, "vera", bundle.method)
