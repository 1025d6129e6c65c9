"""``hydraopt merge ADAPTER_DIR... --heads M --out BUNDLE_DIR [--method NAME] ...``"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path
from typing import TYPE_CHECKING

from hydraopt.cli.bits import add_bits_args, bits_values
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
from hydraopt.errors import HydraoptError
from hydraopt.io.atomic import check_output_dir
from hydraopt.merge.registry import method_info

if TYPE_CHECKING:  # torch: imported when the merge runs, so `merge --help` stays fast
    from hydraopt.types import Bundle, VeraBundle


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("merge", help="merge K adapters into a bundle (shared A' + M heads)")
    add_adapter_args(p)
    p.add_argument("--out", required=True, type=Path, help="bundle directory to create")
    p.add_argument("--force", action="store_true", help="replace an existing --out")
    add_method_args(p)
    add_engine_args(p)
    bits = add_bits_args(p, auto=True)
    bits.add_argument(
        "--max-error",
        type=float,
        metavar="E",
        help="the dual of --budget: the fewest bytes found whose mean hard-routed error (over "
        "modules and tasks, in --distance) is at most E. (--budget PCT, the flag of "
        "shared_basis's config, means the same with a method that takes M: instead of --heads, "
        "M per module, and with --bits auto the width, for the least error within PCT %% of "
        "the K separate adapters' 16-bit bytes; docs/methods.md)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from hydraopt.engine import merge_adapter_set, resolve_config
    from hydraopt.io.bundle import save_bundle
    from hydraopt.quantized_bundle import quantize_merged

    check_output_dir(
        args.out, force=args.force, inputs=args.adapters, force_hint="--force"
    )  # fail before any work, not after
    bits = bits_values(args, allow_auto=True)[0]
    takes_heads = method_info(args.method).takes_heads
    budget_mode = takes_heads and (
        getattr(args, "budget", None) is not None or args.max_error is not None
    )
    if bits == "auto" and not budget_mode:
        raise HydraoptError("--bits auto picks a width per module under --budget PCT; give both")
    if budget_mode and args.heads is not None:
        raise HydraoptError("--budget / --max-error choose M per module; leave out --heads")
    if args.max_error is not None and not takes_heads:
        raise HydraoptError(f"--max-error is for methods that take M, not {args.method}")
    aset = load_selected(args)
    engine = engine_options(args)
    if budget_mode:
        bundle = merge_budget(args, aset, engine, bits)
    else:
        config = resolve_config(
            args.method, method_options(args, args.method), len(aset.tasks), aset.kind
        )
        with progress_bar(len(aset.modules), f"merge {args.method}") as advance:
            bundle = merge_adapter_set(
                aset,
                args.method,
                config,
                engine=engine,
                progress=advance,
                bytes_per_param=BYTES[args.dtype],
            )
    if bits not in (16, "auto") and not budget_mode:
        with progress_bar(len(aset.modules), f"measure at {bits} bits") as advance:
            bundle = quantize_merged(
                bundle, aset, int(bits), args.group_size, dtype=args.dtype, progress=advance
            )
    save_bundle(bundle, args.out, dtype=args.dtype, force=args.force)
    print_summary(bundle)
    print(f"bundle written to {args.out}")
    return 0


def merge_budget(args: argparse.Namespace, aset, engine, bits: int | str) -> Bundle | VeraBundle:
    """``--budget PCT`` with a method that takes M: per-module M (and bits with ``auto``)."""
    from hydraopt.budget_merge import merge_to_budget

    K = len(aset.tasks)
    widths = (16, 8, 4) if bits == "auto" else (int(bits),)
    options = {k: v for k, v in method_options(args, args.method).items() if k != "heads"}
    with progress_bar(K * len(aset.modules), f"merge {args.method} M=1..{K}") as advance:
        bundle, choice = merge_to_budget(
            aset,
            getattr(args, "budget", None),
            max_error=args.max_error,
            method=args.method,
            options=options,
            bits=widths,
            group_size=args.group_size,
            dtype=args.dtype,
            engine=engine,
            progress=advance,
            bytes_per_param=BYTES[args.dtype],
        )
    mix: dict[str, int] = {}
    for name in choice.heads:
        key = f"M={choice.heads[name]} {choice.bits[name]}-bit"
        mix[key] = mix.get(key, 0) + 1
    goal = (
        f"budget {args.budget:g}% = {choice.budget_bytes:,} bytes"
        if args.max_error is None
        else f"max mean error {args.max_error:g}"
    )
    print(
        f"{goal}; chosen {choice.nbytes:,} bytes: "
        + ", ".join(f"{k} x{v}" for k, v in sorted(mix.items()))
    )
    return bundle


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
            [bundle_label(bundle), s.bundle_params, human_bytes(s.bundle_bytes), s.storage_percent],
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


def bundle_label(bundle: Bundle | VeraBundle) -> str:
    """``bundle``, with the bit widths of a quantized one (S % is then a ratio of bytes)."""
    widths = sorted({q.bits for q in bundle.quantized.values()}, reverse=True)
    if not widths:
        return "bundle"
    quantized_modules = {name.rpartition(".")[0] for name in bundle.quantized}
    if any(m.name not in quantized_modules for m in bundle.modules):
        widths.insert(0, 16)  # budget mode left some modules at 16 bits
    return f"bundle ({'/'.join(map(str, widths))}-bit codes + scales; bytes vs 16-bit)"
