"""``hydraopt merge ADAPTER_DIR... --heads M --out BUNDLE_DIR [--method NAME] ...``"""

from __future__ import annotations

import argparse
from pathlib import Path

from hydraopt.analysis import error_by_task
from hydraopt.cli.display import human_bytes, print_table, progress_bar
from hydraopt.cli.options import (
    BYTES,
    add_adapter_args,
    add_bits_args,
    add_engine_args,
    add_method_args,
    bits_values,
    engine_options,
    load_selected,
    method_options,
)
from hydraopt.engine import merge_adapter_set, resolve_config
from hydraopt.io.atomic import check_output_dir
from hydraopt.io.bundle import save_bundle
from hydraopt.quantized_bundle import quantize_merged
from hydraopt.types import Bundle, VeraBundle


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("merge", help="merge K adapters into a bundle (shared A' + M heads)")
    add_adapter_args(p)
    p.add_argument("--out", required=True, type=Path, help="bundle directory to create")
    p.add_argument("--force", action="store_true", help="replace an existing --out")
    add_method_args(p)
    add_engine_args(p)
    add_bits_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    check_output_dir(
        args.out, force=args.force, inputs=args.adapters, force_hint="--force"
    )  # fail before any work, not after
    bits = bits_values(args)[0]
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
    if bits != 16:
        with progress_bar(len(aset.modules), f"measure at {bits} bits") as advance:
            bundle = quantize_merged(
                bundle, aset, int(bits), args.group_size, dtype=args.dtype, progress=advance
            )
    save_bundle(bundle, args.out, dtype=args.dtype, force=args.force)
    print_summary(bundle)
    print(f"bundle written to {args.out}")
    return 0


def print_summary(bundle: Bundle | VeraBundle) -> None:
    """Storage and per-task hard-routed error of a bundle (LoRA or VeRA)."""
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
    per_task = error_by_task(bundle)
    heads_used = {t: len(set(bundle.routing_of(t).values())) for t in bundle.tasks}
    print_table(
        f"hard-routed error per task ({dist}, mean over modules); routing is per module: each "
        "module sends each task to one of its heads, so a task may use different heads in "
        "different modules",
        ["task", dist, "distinct heads used over modules"],
        [[t, per_task.get(t, float("nan")), heads_used[t]] for t in bundle.tasks],
    )


def bundle_label(bundle: Bundle | VeraBundle) -> str:
    """``bundle``, with the bit widths of a quantized one (S % is then a ratio of bytes)."""
    widths = sorted({q.bits for q in bundle.quantized.values()}, reverse=True)
    if not widths:
        return "bundle"
    return f"bundle ({'/'.join(map(str, widths))}-bit codes + scales; bytes vs 16-bit)"
