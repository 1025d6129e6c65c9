"""Budget mode: per module its own head count M (and bit width), under a byte budget.

A uniform M spends heads where they buy little: modules differ in how much their tasks need
apart. Given a budget in percent of the K separate adapters' 16-bit bytes, we merge every
M = 1..K once, store each at every allowed bit width, and read off per module its error curve
(summed hard-routed error over tasks, measured after quantization) against its exact bytes. The
multiple-choice knapsack over modules (:func:`hydraopt.budget.allocate`: greedy on each module's
lower convex hull) picks one (M, bits) per module with the least total error that fits; the
bundle then holds per module the chosen M's factors at the chosen width (docs/methods.md).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from hydraopt.budget import Option, allocate, allocate_for_error
from hydraopt.engine import EngineOptions, merge_adapter_set, resolve_config
from hydraopt.errors import HydraoptError
from hydraopt.kinds.registry import get_kind
from hydraopt.merge.base import config_to_dict
from hydraopt.progress import ProgressArg
from hydraopt.quantized_bundle import (
    DEFAULT_GROUP_SIZE,
    check_bits,
    module_nbytes,
    quantize_merged,
)
from hydraopt.storage import adapters_params


@dataclass(frozen=True)
class BudgetChoice:
    """What budget mode chose.

    Attributes:
        heads: module -> M.
        bits: module -> 16, 8 or 4.
        nbytes: total stored bytes (exact, as in the file).
        budget_bytes: the budget in bytes.
        error: summed hard-routed error over modules and tasks of the choice.
    """

    heads: dict[str, int]
    bits: dict[str, int]
    nbytes: int
    budget_bytes: int
    error: float


def budget_bytes(aset: Any, percent: float) -> int:
    """``percent`` of the K separate adapters' bytes at 16 bits, rounded down to a byte."""
    if not 0.0 < percent <= 100.0:
        raise HydraoptError(f"--budget is a percentage in (0, 100], got {percent}")
    if not get_kind(aset.kind).separate_factors:
        raise HydraoptError("--budget with a method that takes M is for LoRA adapters")
    return int(percent / 100.0 * 2 * adapters_params(aset.modules, len(aset.tasks)))


def _least_error(config: Any) -> Any:
    """``config`` with a default head scale pinned to 1.0: budget mode minimises the error, and
    HydraOpt's M = 1 default calibration (chosen for task quality, not error) would make the
    one-head option look worse than it is. A scale the user set is kept."""
    if getattr(config, "head_scale", 1.0) is None:
        return dataclasses.replace(config, head_scale=1.0)
    return config


@dataclass(frozen=True)
class BudgetCandidates:
    """Every (M, bits) a module may take, merged once: what each budget chooses from.

    Several budgets over the same adapters (``evaluate --budget 10 15 20``) share one set:
    the K merges and their quantized copies are the expensive part, the choice is cheap.

    Attributes:
        method: the registry method (one that takes M).
        configs: the resolved config of M = 1..K, in order.
        merged: M -> the 16-bit bundle.
        stored: (M, bits) -> that bundle as stored at ``bits`` (errors measured after).
        bits: the allowed widths.
        group_size: values per scale at 8/4 bits.
        dtype: the bundle dtype.
        bytes_per_param: bytes of a 16-bit value in ``dtype``.
    """

    method: str
    configs: tuple[Any, ...]
    merged: dict[int, Any]
    stored: dict[tuple[int, int], Any]
    bits: tuple[int, ...]
    group_size: int
    dtype: str
    bytes_per_param: int


def budget_candidates(
    aset: Any,
    *,
    method: str = "hydraopt",
    options: Mapping[str, Any] | None = None,
    bits: Sequence[int] = (16,),
    group_size: int = DEFAULT_GROUP_SIZE,
    dtype: str = "float16",
    engine: EngineOptions | None = None,
    progress: ProgressArg = None,
    bytes_per_param: int = 2,
    least_percent: float | None = None,
) -> BudgetCandidates:
    """Merge M = 1..K once and store each at every width of ``bits``.

    Args:
        least_percent: the smallest budget that will be asked for: refused, if no choice fits
            it, right after M = 1 (before the merges at M > 1).
        the rest: as for :func:`merge_to_budget`.

    Raises:
        HydraoptError: a budget outside (0, 100] or below the smallest bundle; adapters that
            are not LoRA.
    """
    for b in bits:
        check_bits(b, group_size)
    budget = budget_bytes(aset, least_percent if least_percent is not None else 100.0)
    K = len(aset.tasks)
    given = {k: v for k, v in (options or {}).items() if k != "heads"}
    configs = [
        _least_error(resolve_config(method, {**given, "heads": m}, K, aset.kind))
        for m in range(1, K + 1)
    ]
    merged: dict[int, Any] = {}  # M -> 16-bit bundle
    stored: dict[tuple[int, int], Any] = {}  # (M, bits) -> bundle as stored (errors after)
    for m, config in enumerate(configs, start=1):
        merged[m] = merge_adapter_set(
            aset, method, config, engine=engine, progress=progress, bytes_per_param=bytes_per_param
        )
        for b in bits:
            stored[(m, b)] = quantize_merged(merged[m], aset, b, group_size, dtype=dtype)
        if m == 1 and least_percent is not None:
            _check_reachable(stored, bits, budget, least_percent, dtype)
    return BudgetCandidates(
        method, tuple(configs), merged, stored, tuple(bits), group_size, dtype, bytes_per_param
    )


def merge_to_budget(
    aset: Any,
    percent: float | None,
    *,
    max_error: float | None = None,
    method: str = "hydraopt",
    options: Mapping[str, Any] | None = None,
    bits: Sequence[int] = (16,),
    group_size: int = DEFAULT_GROUP_SIZE,
    dtype: str = "float16",
    engine: EngineOptions | None = None,
    progress: ProgressArg = None,
    bytes_per_param: int = 2,
) -> tuple[Any, BudgetChoice]:
    """The bundle with per-module M (and bits) of least total error within ``percent``.

    Args:
        aset: LoRA adapters.
        percent: budget, % of the K separate adapters' 16-bit bytes; or None with
            ``max_error``.
        max_error: the dual: the fewest bytes found whose mean hard-routed error over modules
            and tasks is at most this (:func:`hydraopt.budget.allocate_for_error`).
        method: a registry method that takes M (``hydraopt``).
        options: its other config fields (``heads`` is chosen here).
        bits: the widths a module may be stored at (``(16,)``; ``(16, 8, 4)`` for ``--bits
            auto``).
        group_size: values per scale at 8/4 bits.
        dtype: the bundle dtype.
        engine: as for :func:`~hydraopt.engine.merge_adapter_set`.
        progress: as there; every merge reports its own modules.

    Raises:
        HydraoptError: a budget outside (0, 100] or below the smallest bundle (said before the
            merges at M > 1).
    """
    for b in bits:
        check_bits(b, group_size)
    _check_goal(percent, max_error)
    budget_bytes(aset, percent if percent is not None else 100.0)  # refuse a bad % before merging
    candidates = budget_candidates(
        aset,
        method=method,
        options=options,
        bits=bits,
        group_size=group_size,
        dtype=dtype,
        engine=engine,
        progress=progress,
        bytes_per_param=bytes_per_param,
        least_percent=percent,
    )
    return choose_budget(candidates, aset, percent, max_error=max_error)


def choose_budget(
    candidates: BudgetCandidates,
    aset: Any,
    percent: float | None,
    *,
    max_error: float | None = None,
) -> tuple[Any, BudgetChoice]:
    """Per module the (M, bits) of least total error within ``percent`` (or the fewest bytes
    within ``max_error``), and the bundle holding them; see :func:`merge_to_budget`."""
    _check_goal(percent, max_error)
    budget = budget_bytes(aset, percent if percent is not None else 100.0)
    stored, merged, dtype = candidates.stored, candidates.merged, candidates.dtype
    K = len(aset.tasks)
    if percent is not None:
        _check_reachable(stored, candidates.bits, budget, percent, dtype)
    names = [spec.name for spec in aset.modules]
    keys = sorted(stored)
    sizes = {key: module_nbytes(stored[key], dtype) for key in keys}
    options_per_module = [
        [
            Option(
                sizes[key][name],
                sum(stored[key].provenance.errors[name]),
                f"M={key[0]} {key[1]}-bit",
            )
            for key in keys
        ]
        for name in names
    ]
    if max_error is None:
        choice = allocate(options_per_module, budget)
    else:
        try:
            choice = allocate_for_error(options_per_module, max_error * K * len(names))
        except ValueError:
            least = sum(min(o.error for o in opts) for opts in options_per_module)
            raise HydraoptError(
                f"--max-error {max_error:g} is below the least mean error any choice reaches "
                f"({least / (K * len(names)):.4g})"
            ) from None
    picked = {name: keys[c] for name, c in zip(names, choice.choice, strict=True)}
    heads = {name: key[0] for name, key in picked.items()}
    widths = {name: key[1] for name, key in picked.items()}
    base = merged[1]
    config = {
        **config_to_dict(candidates.configs[-1]),
        "heads": None,  # per module: bundle.json modules[].heads
        "budget": percent,
        "max_error": max_error,
        "bits": list(candidates.bits),
        "group_size": candidates.group_size,
    }
    provenance = dataclasses.replace(
        base.provenance,
        merge_seconds=sum(b.provenance.merge_seconds or 0.0 for b in merged.values()),
        errors={n: merged[heads[n]].provenance.errors[n] for n in names},
    )
    composite = get_kind(aset.kind).build_bundle(
        aset,
        candidates.method,
        config,
        {n: merged[heads[n]].merged[n] for n in names},
        provenance,
        candidates.bytes_per_param,
    )
    bundle = quantize_merged(composite, aset, widths, candidates.group_size, dtype=dtype)
    total = sum(module_nbytes(bundle, dtype).values())
    error = sum(sum(row) for row in bundle.provenance.errors.values())
    return bundle, BudgetChoice(heads, widths, total, budget, error)


def _check_goal(percent: float | None, max_error: float | None) -> None:
    if (percent is None) == (max_error is None):
        raise HydraoptError("give exactly one of --budget PCT and --max-error E")
    if max_error is not None and not max_error >= 0:
        raise HydraoptError(f"--max-error must be a number >= 0, got {max_error}")


def _check_reachable(
    stored: Mapping[tuple[int, int], Any],
    bits: Sequence[int],
    budget: int,
    percent: float,
    dtype: str,
) -> None:
    """Refuse a budget below M = 1 at the narrowest width everywhere, before merging M > 1."""
    smallest = min(sum(module_nbytes(stored[(1, b)], dtype).values()) for b in bits)
    if smallest > budget:
        reference = budget / (percent / 100.0)
        raise HydraoptError(
            f"--budget {percent:g}% ({budget:,} bytes) is below the smallest bundle: M = 1 "
            f"everywhere at {min(bits)} bits takes {smallest:,} bytes "
            f"({100.0 * smallest / reference:.2f}%)"
        )
