"""``hydraopt sweep ADAPTER_DIR... --out DIR``: the whole storage/error trade-off.

Runs HydraOpt for M = 1..K and every baseline (the methods that fix M themselves: the classic
merges, full and A-only) on the same adapters (LoRA or VeRA), planned by
:func:`hydraopt.sweep.plan_sweep`, and writes ``sweep.json``, ``sweep.md`` and ``sweep.png`` (storage % against
hard-routed error).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from hydraopt.cli.bits import add_bits_args, bits_values
from hydraopt.cli.display import print_table, progress_bar
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
from hydraopt.io.atomic import atomic_dir, check_output_dir
from hydraopt.merge.registry import list_methods, method_info


def register(sub: argparse._SubParsersAction) -> None:
    take_heads = [n for n in list_methods() if method_info(n).takes_heads]
    baselines = [n for n in list_methods() if not method_info(n).takes_heads]
    p = sub.add_parser("sweep", help="HydraOpt M=1..K and every baseline -> JSON + PNG trade-off")
    add_adapter_args(p)
    p.add_argument("--out", required=True, type=Path, help="directory to create for the results")
    p.add_argument("--force", action="store_true", help="replace an existing --out")
    p.add_argument(
        "--heads",
        type=int,
        nargs="+",
        help=f"M values of the methods that take M ({', '.join(take_heads)}; default 1..K)",
    )
    p.add_argument(
        "--baselines",
        nargs="*",
        help="methods that fix M themselves to include (default: all of them that merge the "
        f"adapters' kind: {' '.join(baselines)}; shared_basis at --rank or --budget, else at "
        "5, 10 and 20 %%)",
    )
    p.add_argument(
        "--save-bundles", action="store_true", help="also write every bundle under OUT/bundles/"
    )
    add_method_args(p, with_method=False)
    add_engine_args(p)
    add_bits_args(p, many=True)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    # Imported here (torch): building the parser stays fast.
    from hydraopt.analysis import mean_error, plot_tradeoff, relative_error
    from hydraopt.io.bundle import save_bundle
    from hydraopt.sweep import mark_pareto, plan_sweep, plot_bytes_front, separate_points, sweep

    check_output_dir(args.out, force=args.force, inputs=args.adapters, force_hint="--force")
    bits = [int(b) for b in bits_values(args)]
    in_bytes = bits != [16]  # points in bytes against the 16-bit separate adapters (issue 19)
    aset = load_selected(args)
    K = len(aset.tasks)
    engine = engine_options(args)
    # Methods that take M (HydraOpt) first, each over --heads, then the baselines.
    first = [n for n in list_methods() if method_info(n).takes_heads]
    baselines = args.baselines if args.baselines is not None else default_baselines(aset.kind)
    methods = first + [n for n in baselines if n not in first]
    runs = plan_sweep(  # every run's config is checked before any merge starts
        methods,
        K,
        aset.kind,
        heads=args.heads,
        options={name: method_options(args, name) for name in methods},
        bits=bits,
        group_size=args.group_size,
        modules=aset.modules,
    )
    points = []
    with atomic_dir(args.out, force=args.force) as tmp:
        merges = len({(r.method, r.config) for r in runs})  # one merge serves every bit width
        with progress_bar(merges * len(aset.modules), "sweep") as advance:
            merged = sweep(
                aset,
                runs,
                engine=engine,
                progress=advance,
                bytes_per_param=BYTES[args.dtype],
                dtype=args.dtype,
            )
            for run, bundle in merged:
                point = {
                    "label": run.label,
                    "method": run.method,
                    "heads": bundle.num_heads,
                    "storage_percent": bundle.storage.storage_percent,
                    "error": mean_error(bundle),
                    "relative_error": relative_error(bundle),
                    "seconds": bundle.provenance.merge_seconds,
                    "config": bundle.config,
                }
                if in_bytes:
                    point.update(bits=run.bits, bytes=bundle.storage.bundle_bytes)
                points.append(point)
                if args.save_bundles:
                    save_bundle(bundle, tmp / "bundles" / run.dirname, dtype=args.dtype)
        result = {
            "tasks": list(aset.tasks),
            "distance": engine.error_distance,
            "seed": args.seed,
            "points": points,
        }
        y_label = f"hard-routed {engine.error_distance} / {engine.error_distance} of ΔW' = 0"
        if in_bytes:
            points += separate_points(aset, bits, args.group_size, engine.error_distance)
            mark_pareto(points)
            result.update(
                group_size=args.group_size,
                reference_bytes=2 * sum(K * m.r * (m.d + m.k) for m in aset.modules),
            )
            (tmp / "sweep.md").write_text(bytes_table(points, engine.error_distance))
            plot_bytes_front(
                points,
                tmp / "sweep.png",
                y_label=y_label,
                title=f"stored bytes vs reconstruction error, {K} adapters",
            )
        else:
            (tmp / "sweep.md").write_text(markdown_table(points, engine.error_distance))
            plot_tradeoff(
                points,
                tmp / "sweep.png",
                y_key="relative_error",
                y_label=y_label,
                title=f"storage vs reconstruction error, {K} adapters",
                reference=(1.0, "ΔW' = 0 (store nothing)"),
            )
        (tmp / "sweep.json").write_text(json.dumps(result, indent=2) + "\n")
    print_table(
        f"sweep over {K} adapters ({engine.error_distance}, hard-routed, mean over tasks and modules)",
        [
            "system",
            "S % (bytes)" if in_bytes else "S %",
            engine.error_distance,
            "relative",
            "seconds",
        ],
        [
            [p["label"], p["storage_percent"], p["error"], p["relative_error"], p["seconds"]]
            for p in points
        ],
    )
    print(
        f"table: {args.out / 'sweep.md'}\nplot:  {args.out / 'sweep.png'}\njson:  {args.out / 'sweep.json'}"
    )
    return 0


def markdown_table(points: list[dict], distance: str) -> str:
    lines = [
        f"| system | S % | {distance} | relative to ΔW'=0 | seconds |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for p in points:
        lines.append(
            f"| {p['label']} | {p['storage_percent']:.1f} | {p['error']:.4e} | {p['relative_error']:.4f} | {p['seconds']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def default_baselines(kind: str) -> list[str]:
    """Every method that fixes M itself and merges adapters of ``kind`` (shared_basis: LoRA)."""
    from hydraopt.kinds.registry import get_kind
    from hydraopt.merge.registry import get_method

    out = []
    for name in list_methods():
        method = get_method(name)
        try:
            get_kind(kind).config_class(method)
        except HydraoptError:
            continue
        if not method.takes_heads:
            out.append(name)
    return out


def bytes_table(points: list[dict], distance: str) -> str:
    """The sweep in bytes: S % of the 16-bit separate adapters' bytes, Pareto points starred."""
    lines = [
        f"| system | bits | bytes | S % of 16-bit separate | {distance} | relative to ΔW'=0 | Pareto |",
        "| --- | ---: | ---: | ---: | ---: | ---: | :---: |",
    ]
    for p in sorted(points, key=lambda p: p["bytes"]):
        lines.append(
            f"| {p['label']} | {p['bits']} | {p['bytes']:,} | {p['storage_percent']:.2f} | "
            f"{p['error']:.4e} | {p['relative_error']:.4f} | {'*' if p['pareto'] else ''} |"
        )
    return "\n".join(lines) + "\n"
