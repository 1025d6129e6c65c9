"""``hydraopt inspect PATH...``: storage, A/B similarity and hard-routed errors.

Given a bundle dir: its storage table, routing, error per task and the worst modules, plus the
A/B similarity of its source adapters when they are still on disk. Given adapter dirs: their A/B
similarity (the paper's Fig. 2) and what each M would store. VeRA bundles and adapters get the
same report with λd / λb in place of A / B: what is shown of adapters is the kind's
(``show_storage`` / ``show_similarity`` of :class:`~hydraopt.kinds.base.AdapterKind`).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from hydraopt.analysis import error_by_task
from hydraopt.cli.display import print_table
from hydraopt.cli.merge import module_ranks, print_summary
from hydraopt.cli.options import adapter_dirs
from hydraopt.io.bundle import META_NAME, load_any_bundle
from hydraopt.io.peft import load_adapter_set
from hydraopt.kinds.registry import get_kind
from hydraopt.types import Bundle, VeraBundle


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


def show_bundle(bundle: Bundle | VeraBundle, top: int) -> dict:
    print_summary(bundle)
    errors = bundle.provenance.errors
    dist = bundle.provenance.error_distance
    worst = sorted(errors.items(), key=lambda kv: -sum(kv[1]) / len(kv[1]))[:top]
    rows = []
    for name, errs in worst:
        routing = bundle.merged[name].routing.tolist()
        rows.append([name, sum(errs) / len(errs), max(errs), " ".join(map(str, routing))])
    print_table(
        f"worst {len(rows)} modules ({dist}); routing = head per task {list(bundle.tasks)}",
        ["module", f"mean {dist}", f"max {dist}", "routing"],
        rows,
    )
    return {
        "method": bundle.method,
        "config": bundle.config,
        "storage": bundle.storage.to_dict(),
        "error_by_task": error_by_task(bundle),
        "errors": errors,
        "routing": {n: m.routing.tolist() for n, m in bundle.merged.items()},
        **({"ranks": ranks} if (ranks := module_ranks(bundle)) else {}),
    }
