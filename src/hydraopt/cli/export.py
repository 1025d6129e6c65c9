"""``hydraopt export BUNDLE_DIR --out DIR`` -> ``DIR/<task>/`` PEFT adapter dirs (LoRA or VeRA)."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="write one standard PEFT adapter dir per task from a bundle")
    p.add_argument(
        "bundle",
        type=Path,
        metavar="BUNDLE_DIR",
        help="a bundle written by 'hydraopt merge' (or 'sweep --save-bundles'), LoRA or VeRA",
    )
    p.add_argument(
        "--out", required=True, type=Path, help="directory to create, holding <task>/ dirs"
    )
    p.add_argument("--tasks", nargs="+", help="export only these tasks")
    p.add_argument(
        "--dtype",
        choices=("float16", "bfloat16", "float32"),
        help="tensor dtype of the adapters (default: the bundle's). float32 is exact; in float16 "
        "dividing a head by the LoRA scale can round entries that fall in the subnormal range",
    )
    p.add_argument("--force", action="store_true", help="replace an existing --out")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    # imported here, not at the top: they import torch, and `export --help` should not wait on it
    from hydraopt.io.atomic import check_output_dir
    from hydraopt.io.bundle import load_any_bundle
    from hydraopt.io.export import export_peft_adapters

    check_output_dir(args.out, force=args.force, inputs=[args.bundle], force_hint="--force")
    bundle = load_any_bundle(args.bundle)
    written = export_peft_adapters(
        bundle, args.out, tasks=args.tasks, force=args.force, dtype=args.dtype
    )
    for task, path in written.items():
        print(f"{task}: {path}")
    print(f"{len(written)} PEFT adapter dir(s) written under {args.out}")
    return 0
