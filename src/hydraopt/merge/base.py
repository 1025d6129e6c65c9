"""The one interface every merge method implements.

A method works on a :class:`~hydraopt.types.LoraStack` (G same-shaped modules x K tasks, factor
space) and returns a :class:`~hydraopt.types.MergedStack` (shared A', M heads, routing). It never
opens files or parses key names; randomness comes only from the ``torch.Generator`` it is given.

A method that also merges VeRA adapters names a ``vera_config_class`` and implements
``merge_vera`` (:class:`~hydraopt.types.VeraStack` -> :class:`~hydraopt.types.MergedVeraStack`);
the adapter set's kind (:mod:`hydraopt.kinds`) picks the entry point and the config class, never
the method's name.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, runtime_checkable

from hydraopt.errors import HydraoptError

if TYPE_CHECKING:  # torch-free at run time: the registry and the configs import this module
    import torch

    from hydraopt.types import (
        LoraStack,
        MergedVeraStack,
        MergeOutput,
        ModuleSpec,
        VeraStack,
    )


@dataclass(frozen=True)
class MergeContext:
    """Facts about the whole merge that a per-group call cannot see.

    Attributes:
        num_tasks: K.
        num_factor_tensors: A and B tensors per adapter over *all* modules (2 x modules). The paper
            divides its loss by K times this; the faithful solver needs it to reproduce the
            paper's gradient scale, which matters for AdamW's epsilon.
    """

    num_tasks: int
    num_factor_tensors: int


class MergeMethod(Protocol):
    """A registered merge method. ``name`` is the registry, CLI and bundle-metadata name."""

    @property
    def name(self) -> str:
        """Registry name (read-only: a class attribute or an instance attribute both fit)."""
        ...

    config_class: ClassVar[type]
    space: ClassVar[str]  # "factors" (A and B merged separately) or "delta" (fits B @ A)
    vera_config_class: ClassVar[type | None]  # None: the method does not merge VeRA adapters
    # True: the user chooses M (config field ``heads``, required; a sweep runs M = 1..K).
    # False: the method fixes M itself (``num_heads``); a given ``heads`` must equal it.
    takes_heads: ClassVar[bool]

    def num_heads(self, config: Any, num_tasks: int) -> int:
        """M, the number of B heads stored per module."""
        ...

    def label(self, num_heads: int) -> str:
        """How results of this method are labelled in tables and plots (e.g. ``hydraopt M=2``)."""
        ...

    def merge(
        self, stack: LoraStack, config: Any, *, generator: torch.Generator, context: MergeContext
    ) -> MergeOutput:
        """Merge G modules of K adapters (a :class:`~hydraopt.types.MergedStack` for most)."""
        ...

    def merge_vera(
        self, stack: VeraStack, config: Any, *, generator: torch.Generator, context: MergeContext
    ) -> MergedVeraStack:
        """Merge G modules of K VeRA adapters (only if ``vera_config_class`` is set)."""
        ...

    # Optional: ``applied_config(config, num_tasks, device) -> dict``, the fields of ``config`` that a
    # merge of K = num_tasks adapters uses, resolved; see :func:`applied_config` (a method
    # without it records every field). A method whose VeRA config is its own class names that
    # config's fields with ``applied_vera_config(config, num_tasks) -> dict``.


@runtime_checkable
class ModulePlanner(Protocol):
    """Optional: a method that chooses a config per module before any module is merged.

    The engine calls ``plan_modules`` with every module's shape (and, where
    ``needs_survey(config)``, each module's ``survey`` of its stacked adapters, computed chunk
    by chunk in a first pass); the returned configs, if any, replace ``config`` module by module
    and chunks hold modules of one config. ``shared_basis`` spends a storage budget this way.
    """

    def needs_survey(self, config: Any) -> bool:
        """Whether ``plan_modules`` needs the modules' surveys for this config."""
        ...

    def survey(self, stack: LoraStack, config: Any) -> torch.Tensor:
        """What planning needs to know of G modules, (G, ...)."""
        ...

    def plan_modules(
        self,
        config: Any,
        modules: Sequence[ModuleSpec],
        num_tasks: int,
        surveys: dict[str, torch.Tensor] | None,
    ) -> dict[str, Any] | None:
        """Module name -> its config, or None: ``config`` for every module (after checks)."""
        ...


@runtime_checkable
class SweepPoints(Protocol):
    """Optional: a method that a sweep runs at several storage points (``shared_basis``: a
    rank or budget each), labelled ``<label> <point_label>`` (``shared_basis 10 %``)."""

    def sweep_points(
        self, options: dict[str, Any], modules: Sequence[ModuleSpec] = (), num_tasks: int = 0
    ) -> list[dict[str, Any]]:
        """The option sets of a sweep's runs, from the options the user gave (and, when given,
        the adapters' modules and K: default points that cannot fit them are left out)."""
        ...

    def point_label(self, config: Mapping[str, Any]) -> str:
        """What tells this run apart, from its config as a dict (``config_to_dict``)."""
        ...


def check_heads(heads: int, num_tasks: int | None = None) -> None:
    """The one check of M: 1 <= M, and M <= K once the number of adapters K is known.

    Configs call it without K when built; the engine and the methods call it with K.

    Raises:
        HydraoptError: for an M out of range.
    """
    if heads < 1:
        raise HydraoptError(f"heads must be >= 1, got {heads}")
    if num_tasks is not None and heads > num_tasks:
        raise HydraoptError(f"heads = {heads} exceeds the number of adapters K = {num_tasks}")


def method_heads(method: MergeMethod, config: Any, num_tasks: int) -> int:
    """M that ``method`` stores with ``config`` for K = ``num_tasks``, checked.

    Raises:
        HydraoptError: for an M out of 1..K, or a ``heads`` that a method which fixes M itself
            (``takes_heads = False``) does not store.
    """
    heads = method.num_heads(config, num_tasks)
    check_heads(heads, num_tasks)
    asked = getattr(config, "heads", None)
    if asked is not None and asked != heads:
        raise HydraoptError(f"{method.name} stores {heads} head(s); got heads = {asked}")
    return heads


def build_config(config_class: type, options: dict[str, Any]) -> Any:
    """Build a frozen config from the options it knows; refuse the ones it does not.

    ``None`` values mean "not given" and are skipped, so a CLI can pass every flag it has.
    """
    names = {f.name for f in dataclasses.fields(config_class)}
    given = {k: v for k, v in options.items() if v is not None}
    unknown = sorted(set(given) - names)
    if unknown:
        raise HydraoptError(
            f"option(s) {unknown} do not apply to this method (it takes {sorted(names)})"
        )
    return config_class(**given)


def config_to_dict(config: Any) -> dict[str, Any]:
    """A JSON-friendly dict of a config dataclass (tuples become lists)."""
    out = {}
    for f in dataclasses.fields(config):
        v = getattr(config, f.name)
        out[f.name] = list(v) if isinstance(v, tuple) else v
    return out


def select_fields(config: Any, used: set[str], **resolved: Any) -> dict[str, Any]:
    """:func:`config_to_dict` of the ``used`` fields only (in field order), with the ``resolved``
    values (e.g. a default that depends on K, worked out) in place of the given ones."""
    values = {**config_to_dict(config), **resolved}
    return {f.name: values[f.name] for f in dataclasses.fields(config) if f.name in used}


def applied_config(
    method: MergeMethod, config: Any, num_tasks: int, device: str = "cpu"
) -> dict[str, Any]:
    """The fields of ``config`` that applied to a merge of K = ``num_tasks`` adapters, resolved:
    what bundles (``bundle.json``), sweeps and exports record as the method's ``config``.

    A method names them with its own ``applied_config(config, num_tasks)`` (HydraOpt's default
    solver, for one, never reads the paper solver's ``epochs``); a method without one records
    every field. Left-out fields did not change the result: :func:`build_config` of the record
    rebuilds a config that merges the same tensors (tests/unit/merge/test_applied_config.py).
    """
    own = getattr(method, "applied_config", None)
    if own is None:
        return config_to_dict(config)
    # ``device``: where the merge ran (a default may depend on it, e.g. HydraOpt's precision path).
    return dict(own(config, num_tasks, device=device))
