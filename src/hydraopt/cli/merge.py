"""``hydraopt merge ADAPTER_DIR... --heads M --out BUNDLE_DIR [--method NAME] ...``"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path
from typing import TYPE_CHECKING

from hydraopt.cli.display import human_bytes, print_table, progress_bar
from hydraopt.cli.options import (
    BYTES,
    add_adapter_args,
    add_engine_args,
    add_method_args,
    engine_options,
    load_selected,
    method_options,
)
from hydraopt.io.atomic import check_output_dir

if TYPE_CHECKING:  # torch: imported when the merge runs, so `merge --help` stays fast
    from hydraopt.types import Bundle, VeraBundle


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("merge", help="merge K adapters into a bundle (shared A' + M heads)")
    add_adapter_args(p)
    p.add_argument("--out", required=True, type=Path, help="bundle directory to create")
    p.add_argument("--force", action="store_true", help="replace an existing --out")
    add_method_args(p)
    add_engine_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from hydraopt.engine import merge_adapter_set, resolve_config
    from hydraopt.io.bundle import save_bundle

    check_output_dir(
        args.out, force=args.force, inputs=args.adapters, force_hint="--force"
    )  # fail before any work, not after
    aset = load_selected(args)
    config = resolve_config(
        args.method, method_options(args, args.method), len(aset.tasks), aset.kind
    )
    engine = engine_options(args)
    with progress_bar(len(aset.modules), f"merge {args.method}") as advance:
        bundle = merge_adapter_set(
            aset,
            args.method,
            config,
            engine=engine,
            progress=advance,
            bytes_per_param=BYTES[args.dtype],
        )
    save_bundle(bundle, args.out, dtype=args.dtype, force=args.force)
    print_summary(bundle)
    print(f"bundle written to {args.out}")
    return 0


def print_summary(bundle: Bundle | VeraBundle) -> None:
    """Storage and per-task hard-routed error of a bundle (LoRA or VeRA)."""
    from hydraopt.analysis import error_by_task

    s = bundle.storage
    dist = bundle.provenance.error_distance
    print_table(
        f"{bundle.method} over {len(bundle.tasks)} adapters, {len(bundle.modules)} modules "
        f"({bundle.provenance.merge_seconds or 0:.1f} s)",
        ["", "parameters", "bytes", "S %"],
        [
            ["separate adapters", s.adapters_params, human_bytes(s.adapters_bytes), 100.0],
            ["bundle", s.bundle_params, human_bytes(s.bundle_bytes), s.storage_percent],
        ],
    )
    line = rank_line(bundle)
    if line:
        print(line)
    # What the bundle records: the config fields that applied (older bundles: every field).
    applied = ", ".join(f"{k}={v}" for k, v in bundle.config.items())
    print(f"config: {applied or '(none)'}")
    per_task = error_by_task(bundle)
    heads_used = {t: len(set(bundle.routing_of(t).values())) for t in bundle.tasks}
    print_table(
        f"hard-routed error per task ({dist}, mean over modules); routing is per module: each "
        "module sends each task to one of its heads, so a task may use different heads in "
        "different modules",
        ["task", dist, "distinct heads used over modules"],
        [[t, per_task.get(t, float("nan")), heads_used[t]] for t in bundle.tasks],
    )


def module_ranks(bundle: Bundle | VeraBundle) -> dict[str, int]:
    """R per module of a shared-basis bundle ({} for other bundles)."""
    from hydraopt.results import MergedBasisModule

    return {n: m.rank for n, m in bundle.merged.items() if isinstance(m, MergedBasisModule)}


def rank_line(bundle: Bundle | VeraBundle) -> str | None:
    """``rank R per module: min 4, median 8, max 16 (core full)`` for a shared-basis bundle."""
    from hydraopt.results import MergedBasisModule

    records = [m for m in bundle.merged.values() if isinstance(m, MergedBasisModule)]
    if not records:
        return None
    ranks, core = sorted(m.rank for m in records), records[0].core
    return (
        f"rank R per module: min {ranks[0]}, median {statistics.median(ranks):g}, "
        f"max {ranks[-1]} over {len(ranks)} modules (core {core})"
    )
