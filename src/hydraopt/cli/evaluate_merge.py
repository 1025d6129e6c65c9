"""``hydraopt evaluate --merge-from``: the bundles it evaluates, merged once and cached under
``OUT/bundles/`` -- every ``--methods`` merge and HydraOpt ``--heads`` M at every ``--bits``
width, and HydraOpt in budget mode at every ``--budget`` (issue 19)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from hydraopt.cli.bits import bits_values
from hydraopt.errors import HydraoptError
from hydraopt.kinds.names import KIND_TRAITS

if TYPE_CHECKING:
    from hydraopt.types import Bundle, VeraBundle

BUDGET_METHOD = "hydraopt"  # --budget: the method whose M is chosen per module


def merge_kind(args: argparse.Namespace) -> str:
    """``"lora"`` or ``"vera"``: the kind of ``--merge-from``'s adapters (its first task's dir;
    ``load_adapter_set`` refuses a mix when it merges).

    Raises:
        HydraoptError: For a task without an adapter dir (naming the path it expected).
    """
    from hydraopt.eval.systems import adapter_kind

    root: Path = args.merge_from
    missing = [t for t in args.tasks if not (root / t / "adapter_config.json").is_file()]
    if missing:
        raise HydraoptError(
            f"--merge-from {root}: no PEFT adapter for task(s) {missing} "
            f"(expected {root}/<task>/adapter_config.json)"
        )
    return adapter_kind(root / args.tasks[0])


def build_bundles(args: argparse.Namespace) -> list[Path]:
    """Merge ``--merge-from``'s adapters with every method, reusing ``OUT/bundles/<name>``.

    LoRA and VeRA adapters take the same path: ``load_adapter_set`` reads either kind, each
    method is resolved with that kind's config, and the bundles are saved as that kind.

    Returns:
        The bundle dirs, baselines first (in ``--methods`` order), then HydraOpt by M.

    Raises:
        HydraoptError: For a missing adapter, a bad method or M, or a cached bundle made from
            other tasks, another seed or another adapter kind.
    """
    from hydraopt.engine import EngineOptions
    from hydraopt.io.bundle import load_any_bundle, save_bundle
    from hydraopt.io.peft import load_adapter_set
    from hydraopt.merge.base import SweepPoints
    from hydraopt.merge.registry import get_method, list_methods
    from hydraopt.sweep import plan_sweep, sweep

    root: Path = args.merge_from
    tasks = list(args.tasks)
    kind = merge_kind(args)
    known = list_methods()
    unknown = [m for m in args.methods if m not in known]
    if unknown:
        raise HydraoptError(f"unknown --methods {unknown}; known: {known}")
    methods = list(dict.fromkeys(args.methods))
    methods += [m for m in known if get_method(m).takes_heads and m not in methods]
    # Refuses a bad M or bit width before spending time on any merge.
    bits = [int(b) for b in bits_values(args)]
    # The adapters' modules (headers only) let shared_basis leave out default budgets that
    # cannot fit them, as `hydraopt sweep` does, instead of failing the whole run.
    modules = ()
    if any(isinstance(get_method(m), SweepPoints) for m in methods):
        dirs = [root / t for t in tasks]
        modules = load_adapter_set(dirs, tasks, check_values=False).modules
    runs = plan_sweep(
        methods,
        len(tasks),
        kind,
        heads=args.heads,
        bits=bits,
        group_size=args.group_size,
        modules=modules,
    )
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    paths, todo = [], []
    for run in runs:
        path = args.out / "bundles" / run.dirname
        if (path / "bundle.json").is_file():
            cached = load_any_bundle(path)
            _check_cached_bundle(cached, path, tasks, args.seed, kind)
            if {(q.bits, q.group_size) for q in cached.quantized.values()} - {
                (run.bits, run.group_size)
            }:
                raise HydraoptError(
                    f"{path} was quantized with another group size than --group-size "
                    f"{run.group_size}; delete it or use another --out"
                )
        else:
            todo.append(run)
        paths.append(path)
    if todo:
        aset = load_adapter_set([root / t for t in tasks], tasks)
        for run, bundle in sweep(
            aset,
            todo,
            engine=EngineOptions(seed=args.seed),
            progress=not args.quiet,
            on_start=lambda run: print(f"merging {run.dirname} ...", file=sys.stderr),
        ):
            save_bundle(bundle, args.out / "bundles" / run.dirname)
    return paths


def _check_cached_bundle(
    bundle: Bundle | VeraBundle, path: Path, tasks: list[str], seed: int, kind: str
) -> None:
    merged_seed = bundle.provenance.seed
    if list(bundle.tasks) != tasks or (merged_seed is not None and merged_seed != seed):
        raise HydraoptError(
            f"{path} was merged from tasks {list(bundle.tasks)} with seed "
            f"{merged_seed}, not {tasks} with seed {seed}; delete it or use another --out"
        )
    found = bundle.kind
    if found != kind:
        raise HydraoptError(
            f"{path} was merged from {found.upper()} adapters, but --merge-from holds "
            f"{kind.upper()} adapters; delete it or use another --out"
        )


def budget_dirname(percent: float, bits: Sequence[int]) -> str:
    """``hydraopt_budget20`` (16 bits only) or ``hydraopt_budget20_16-8-4-bit``."""
    widths = "" if list(bits) == [16] else "_" + "-".join(map(str, bits)) + "-bit"
    return f"{BUDGET_METHOD}_budget{percent:g}{widths}"


def check_budgets(args: argparse.Namespace) -> list[float]:
    """``--budget``'s percentages, checked before any work (none: ``[]``).

    Raises:
        HydraoptError: without ``--merge-from``, a value outside (0, 100], or one given twice.
    """
    budgets = list(args.budget or [])
    if budgets and args.merge_from is None:
        raise HydraoptError("--budget merges the adapters of --merge-from; give it too")
    bad = [p for p in budgets if not 0.0 < p <= 100.0]
    if bad:
        raise HydraoptError(f"--budget is a percentage in (0, 100], got {bad[0]:g}")
    if len(set(budgets)) != len(budgets):
        raise HydraoptError(f"--budget lists a value twice: {' '.join(f'{p:g}' for p in budgets)}")
    return budgets


def build_budget_bundles(args: argparse.Namespace) -> list[Path]:
    """HydraOpt in budget mode at every ``--budget``, reusing ``OUT/bundles/<name>``.

    The K merges (M = 1..K, each stored at every ``--bits`` width) are done once and shared by
    the budgets that are not cached yet (:func:`hydraopt.budget_merge.budget_candidates`).

    Raises:
        HydraoptError: VeRA adapters, a budget below the smallest bundle, or a cached bundle
            made from other tasks, seed, budget, widths or group size.
    """
    budgets = check_budgets(args)
    if not budgets:
        return []
    from hydraopt.budget_merge import budget_candidates, choose_budget
    from hydraopt.engine import EngineOptions
    from hydraopt.io.bundle import load_any_bundle, save_bundle
    from hydraopt.io.peft import load_adapter_set

    tasks = list(args.tasks)
    kind = merge_kind(args)
    if not KIND_TRAITS[kind].separate_factors:  # budgets are shares of the factors' bytes
        factored = " or ".join(t.display_name for t in KIND_TRAITS.values() if t.separate_factors)
        raise HydraoptError(
            f"--budget is for {factored} adapters; --merge-from holds "
            f"{KIND_TRAITS[kind].display_name} adapters"
        )
    bits = [int(b) for b in bits_values(args)]
    paths, todo = [], []
    for percent in budgets:
        path = args.out / "bundles" / budget_dirname(percent, bits)
        if (path / "bundle.json").is_file():
            cached = load_any_bundle(path)
            _check_cached_bundle(cached, path, tasks, args.seed, kind)
            got = (cached.config.get("budget"), cached.config.get("bits"))
            if got != (percent, bits) or cached.config.get("group_size") != args.group_size:
                raise HydraoptError(
                    f"{path} holds budget {got[0]} % at bits {got[1]}, group size "
                    f"{cached.config.get('group_size')}, not {percent:g} % at {bits}, group size "
                    f"{args.group_size}; delete it or use another --out"
                )
        else:
            todo.append((percent, path))
        paths.append(path)
    if todo:
        aset = load_adapter_set([args.merge_from / t for t in tasks], tasks)
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        # Progress: each merge's own bar (M = 1..K); after M = 1 a budget below the
        # smallest bundle is refused.
        candidates = budget_candidates(
            aset,
            method=BUDGET_METHOD,
            bits=bits,
            group_size=args.group_size,
            engine=EngineOptions(seed=args.seed),
            progress=not args.quiet,
            least_percent=min(p for p, _ in todo),
        )
        for percent, path in todo:
            bundle, choice = choose_budget(candidates, aset, percent)
            save_bundle(bundle, path)
            print(
                f"budget {percent:g}%: {choice.nbytes:,} of {choice.budget_bytes:,} bytes",
                file=sys.stderr,
            )
    return paths
