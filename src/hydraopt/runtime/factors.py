"""The one place the runtime reads a bundle: every bundle kind as shared A' + heads + routing.

Whatever a bundle stores (HydraOpt's A' and M heads, a classic merge's single head, an A-only
merge's K heads, VeRA's λ rows over frozen projections), its update of module ``n`` for task ``i``
is ``ΔW_i = heads[routing[i]] @ A'``. The runtime needs only that view, so this module is the
adapter between bundle internals and the serving layers; a new bundle kind gives its bundle a
``factored_view()`` and nothing in runtime/ or serve/ changes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from hydraopt.io.bundle import load_any_bundle
from hydraopt.types import Bundle, VeraBundle


@dataclass(frozen=True)
class ModuleFactors:
    """One adapted linear module as the runtime holds it.

    Attributes:
        A: (r, k) the shared A', held once for every task.
        heads: (M, d, r) the heads, any scale folded in (ΔW_i = heads[routing[i]] @ A); with a
            ``basis``, (M, R, r) heads in it.
        routing: (K,) int64 head index of each task.
        basis: None, or (d, R) the shared left factor, held once (ΔW_i = basis @
            heads[routing[i]] @ A): a ``shared_basis`` bundle's U.
    """

    A: torch.Tensor
    heads: torch.Tensor
    routing: torch.Tensor
    basis: torch.Tensor | None = None

    @property
    def shape(self) -> tuple[int, int, int]:
        """(d, k, r) of the module."""
        d = self.heads.shape[1] if self.basis is None else self.basis.shape[0]
        return int(d), int(self.A.shape[1]), int(self.A.shape[0])


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
        The :class:`SharedFactors` of every module, float32 — from the bundle's own
        ``factored_view()``, which every bundle kind has: a shared left factor
        (``shared_basis``'s U) stays apart, held once beside the K small cores.
    """
    loaded = load_any_bundle(bundle) if isinstance(bundle, (str, Path)) else bundle
    modules = {
        name: ModuleFactors(
            view.A.float(),
            view.heads.float(),
            view.routing.long(),
            None if view.basis is None else view.basis.float(),
        )
        for name, view in loaded.factored_view().items()
    }
    return SharedFactors(loaded.tasks, loaded.base_model, modules, loaded.kind, loaded.method)
