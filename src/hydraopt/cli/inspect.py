"""``hydraopt inspect PATH...``: storage, A/B similarity and hard-routed errors.

Given a bundle dir: its storage table, routing, error per task and the worst modules, plus the
A/B similarity of its source adapters when they are still on disk. Given adapter dirs: their A/B
similarity (the paper's Fig. 2) and what each M would store. VeRA bundles and adapters get the
same report with λd / λb in place of A / B: what is shown of adapters is the kind's
(``show_storage`` / ``show_similarity`` of :class:`~hydraopt.kinds.base.AdapterKind`); a
bundle's report is :mod:`hydraopt.cli.inspect_report`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from hydraopt.cli.options import adapter_dirs


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "inspect", help="storage table, A/B similarity, hard-routed error per task/module"
    )
    p.add_argument("paths", nargs="+", metavar="PATH", help="a bundle dir, or adapter dirs")
    p.add_argument("--plot", type=Path, help="write the A/B similarity heatmaps to this PNG")
    p.add_argument(
        "--module-filter",
        default=None,
        help="similarity only over modules containing this text (e.g. q_proj)",
    )
    p.add_argument(
        "--top",
        type=int,
        default=10,
        help="how many worst modules to list for a bundle (default 10)",
    )
    p.add_argument("--json", type=Path, help="write everything shown as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    # The report's modules need torch: imported here, so `inspect --help` stays fast.
    from hydraopt.cli.inspect_report import show_bundle
    from hydraopt.io.bundle import META_NAME, load_any_bundle
    from hydraopt.io.peft import load_adapter_set
    from hydraopt.kinds.registry import get_kind

    report: dict = {}
    aset: Any = None
    if len(args.paths) == 1 and (Path(args.paths[0]) / META_NAME).is_file():
        bundle = load_any_bundle(args.paths[0])
        report["bundle"] = show_bundle(bundle, args.top)
        sources = bundle.provenance.sources
        paths = [sources.get(t) for t in bundle.tasks]
        if paths and all(p and Path(p).is_dir() for p in paths):
            aset = load_adapter_set(paths, list(bundle.tasks), check_values=False)
        else:
            print("(source adapters not found on disk: A/B similarity skipped)")
    else:
        aset = load_adapter_set(adapter_dirs(args.paths), check_values=False)
        report["storage"] = get_kind(aset.kind).show_storage(aset)
    if aset is not None:
        report["similarity"] = get_kind(aset.kind).show_similarity(
            aset, args.module_filter, args.plot
        )
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"JSON written to {args.json}")
    return 0
