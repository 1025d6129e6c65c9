"""``hydraopt sweep ADAPTER_DIR... --out DIR``: the whole storage/error trade-off.

Runs HydraOpt for M = 1..K and every classic baseline (full and A-only) on the same adapters
(LoRA or VeRA) and writes ``sweep.json``, ``sweep.md`` and ``sweep.png`` (storage % against
hard-routed error).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from hydraopt.analysis import mean_error, plot_tradeoff, relative_error
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
from hydraopt.engine import merge_adapter_set, resolve_config
from hydraopt.io.atomic import atomic_dir, check_output_dir
from hydraopt.io.bundle import save_bundle
from hydraopt.merge.classic import A_ONLY_METHODS, CLASSIC_METHODS


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sweep", help="HydraOpt M=1..K and every baseline -> JSON + PNG trade-off")
    add_adapter_args(p)
    p.add_argument("--out", required=True, type=Path, help="directory to create for the results")
    p.add_argument("--force", action="store_true", help="replace an existing --out")
    p.add_argument("--heads", type=int, nargs="+", help="HydraOpt M values (default 1..K)")
    p.add_argument(
        "--baselines",
        nargs="*",
        default=list(CLASSIC_METHODS + A_ONLY_METHODS),
        help="baseline methods to include (default: all classic and A-only)",
    )
    p.add_argument(
        "--save-bundles", action="store_true", help="also write every bundle under OUT/bundles/"
    )
    add_method_args(p, with_method=False)
    add_engine_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    check_output_dir(args.out, force=args.force, inputs=args.adapters, force_hint="--force")
    aset = load_selected(args)
    K = len(aset.tasks)
    engine = engine_options(args)
    runs = [("hydraopt", m) for m in (args.heads or range(1, K + 1))]
    runs += [(name, None) for name in args.baselines]
    configs = []
    for method, heads in runs:  # validate every run before spending time on any
        options = method_options(args, method)
        options["heads"] = heads
        configs.append(resolve_config(method, options, K, aset.kind))
    points, bundles = [], {}
    with atomic_dir(args.out, force=args.force) as tmp:
        with progress_bar(len(runs) * len(aset.modules), "sweep") as advance:
            for method, heads in runs:
                options = method_options(args, method)
                options["heads"] = heads
                bundle = merge_adapter_set(
                    aset,
                    method,
                    options,
                    engine=engine,
                    progress=advance,
                    bytes_per_param=BYTES[args.dtype],
                )
                label = f"hydraopt M={heads}" if method == "hydraopt" else method
                points.append(
                    {
                        "label": label,
                        "method": method,
                        "heads": bundle.num_heads,
                        "storage_percent": bundle.storage["storage_percent"],
                        "error": mean_error(bundle),
                        "relative_error": relative_error(bundle),
                        "seconds": bundle.extra["merge_seconds"],
                        "config": bundle.config,
                    }
                )
                if args.save_bundles:
                    bundles[label] = bundle
                    save_bundle(
                        bundle,
                        tmp / "bundles" / label.replace(" ", "_").replace("=", ""),
                        dtype=args.dtype,
                    )
        result = {
            "tasks": list(aset.tasks),
            "distance": engine.error_distance,
            "seed": args.seed,
            "points": points,
        }
        (tmp / "sweep.json").write_text(json.dumps(result, indent=2) + "\n")
        (tmp / "sweep.md").write_text(markdown_table(points, engine.error_distance))
        plot_tradeoff(
            points,
            tmp / "sweep.png",
            y_key="relative_error",
            y_label=f"hard-routed {engine.error_distance} / {engine.error_distance} of ΔW' = 0",
            title=f"storage vs reconstruction error, {K} adapters",
            reference=(1.0, "ΔW' = 0 (store nothing)"),
        )
    print_table(
        f"sweep over {K} adapters ({engine.error_distance}, hard-routed, mean over tasks and modules)",
        ["system", "S %", engine.error_distance, "relative", "seconds"],
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
