"""Storage vs hard-routed MAE: the two-sided shared basis next to HydraOpt, classic merges and peers.

Points, all on the same adapters and the same error (mean over tasks and modules of
MAE(ΔW_i, deployed ΔW'_i), scale included — the measure of benchmarks/real_adapters.py and of
every bundle):
  - ``shared_basis`` (``hydraopt.merge.shared_basis``): uniform R in ``--ranks`` and rank per
    module for each budget in ``--budgets`` (percent of the K separate adapters' parameters),
    full cores, closed form (HOSVD + sweeps) and, with ``--refine-steps N``, MAE-refined too;
    ``--diagonal`` adds the diagonal-core points. Storage = Σ d R + k R + K R² (or K R), exact.
  - HydraOpt M = 1 .. K and the classic merges through ``hydraopt.merge_adapter_set``.
  - ``vlora-dev`` n = 1 .. K-1 and ``lorashare`` k in ``--lorashare-k`` (benchmarks/peers.py).

Times are CPU seconds of this process (``time.process_time``; the peers' are wall seconds, as
benchmarks/peers.py measures them): on a shared machine wall time mostly measures the neighbours.

The shared basis is not registered as a method yet, so this script drives the pure tensor
functions itself: one stack per module shape (budget points: one per shape and rank).

Usage: python benchmarks/shared_basis_curve.py [--adapters DIR...] [--out DIR]
Writes OUT/shared_basis_curve.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch
from peers import lorashare_points, vlora_points
from real_adapters import commit, machine

from hydraopt import load_adapter_set, merge_adapter_set
from hydraopt.analysis import mean_error
from hydraopt.io.peft import AdapterSet
from hydraopt.merge.classic import CLASSIC_METHODS
from hydraopt.merge.shared_basis import Core
from hydraopt.merge.shared_basis_budget import (
    allocate_ranks,
    basis_params,
    budget_params,
    curve_for_distance,
    rank_curves,
)
from hydraopt.merge.shared_basis_refine import fit_shared_basis
from hydraopt.storage import adapters_params
from hydraopt.types import LoraStack, ModuleSpec

REPO = Path(__file__).resolve().parents[1]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    default = sorted((REPO.parent / "shared" / "adapters").glob("en-*"))
    p.add_argument("--adapters", nargs="+", type=Path, default=default)
    p.add_argument("--layers", help="comma-separated layer indices (default: all)")
    p.add_argument("--ranks", type=int, nargs="+", default=[4, 8, 16, 32])
    p.add_argument("--budgets", type=float, nargs="+", default=[5.0, 10.0, 20.0])
    p.add_argument("--sweeps", type=int, default=8)
    p.add_argument("--refine-steps", type=int, default=0, help="also refined points (0: none)")
    p.add_argument("--refine-lr", type=float, default=0.02)
    p.add_argument("--diagonal", action="store_true", help="also diagonal-core points")
    p.add_argument("--lorashare-k", type=int, nargs="+", default=[4, 8, 16, 32])
    p.add_argument("--skip-ours", action="store_true", help="no HydraOpt / classic points")
    p.add_argument("--skip-basis", action="store_true", help="no shared_basis points")
    p.add_argument("--heads", type=int, nargs="*", help="HydraOpt M values (default 1..K)")
    p.add_argument("--skip-peers", action="store_true")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "shared-basis")
    return p.parse_args()


def load_groups(aset: AdapterSet) -> list[tuple[list[ModuleSpec], LoraStack]]:
    """One stack per module shape: (G, K, ...) factors, G = modules of that shape."""
    by_shape: dict[tuple[int, int, int], list[ModuleSpec]] = {}
    for spec in aset.modules:
        by_shape.setdefault(spec.shape_key, []).append(spec)
    return [(specs, aset.load_stack(specs)) for specs in by_shape.values()]


def fit_point(
    groups: list[tuple[list[ModuleSpec], LoraStack]],
    ranks: dict[str, int],
    core: Core,
    args: argparse.Namespace,
    refine_steps: int,
) -> tuple[float, int, float]:
    """Fit every module at its rank; returns (mean MAE, parameters kept, CPU seconds)."""
    start = time.process_time()
    errors, kept, K = [], 0, 0
    for specs, stack in groups:
        K = stack.A.shape[1]
        for R in sorted({ranks[s.name] for s in specs}):
            idx = torch.tensor([i for i, s in enumerate(specs) if ranks[s.name] == R])
            out = fit_shared_basis(
                stack.A[idx],
                stack.scaled_B[idx],
                R,
                core=core,
                sweeps=args.sweeps,
                distance="mae",
                refine_steps=refine_steps,
                refine_lr=args.refine_lr,
            )
            assert out.measured is not None
            errors.append(out.measured.error)  # (g, K)
            kept += sum(basis_params(specs[i].d, specs[i].k, K, R, core) for i in idx.tolist())
    mae = float(torch.cat(errors).double().mean())
    return mae, kept, time.process_time() - start


def basis_points(aset: AdapterSet, args: argparse.Namespace) -> list[dict[str, Any]]:
    groups = load_groups(aset)
    K = len(aset.tasks)
    full = adapters_params(aset.modules, K)
    cores: list[Core] = ["full", "diagonal"] if args.diagonal else ["full"]
    steps = [0] + ([args.refine_steps] if args.refine_steps > 0 else [])
    points = []

    def add(label: str, ranks: dict[str, int], core: Core, n: int, extra_s: float) -> None:
        mae, kept, seconds = fit_point(groups, ranks, core, args, n)
        tag = f"{label}{' diag' if core == 'diagonal' else ''}{f' +{n} steps' if n else ''}"
        points.append(
            {
                "method": "shared_basis",
                "label": tag,
                "storage_percent": 100.0 * kept / full,
                "mae": mae,
                "seconds": seconds + extra_s,
                "ranks": sorted(set(ranks.values())),
            }
        )
        print(
            f"{tag}: S {points[-1]['storage_percent']:.2f} %, MAE {mae:.4e}, {seconds + extra_s:.1f} CPU s"
        )

    for core in cores:
        start = time.process_time()
        curves, shapes, names = [], [], []
        for specs, stack in groups:
            raw = rank_curves(stack.A, stack.scaled_B, core)  # (G, R_max + 1)
            curves += list(curve_for_distance(raw, specs[0].d, specs[0].k, "mae"))
            shapes += [(s.d, s.k) for s in specs]
            names += [s.name for s in specs]
        curve_s = time.process_time() - start
        print(f"rank curves ({core}): {curve_s:.1f} CPU s")
        for n in steps:
            for R in args.ranks:
                add(f"shared_basis R={R}", dict.fromkeys(names, R), core, n, 0.0)
            for pct in args.budgets:
                budget = budget_params([(m.d, m.k, m.r) for m in aset.modules], K, pct)
                start = time.process_time()
                alloc = allocate_ranks(curves, shapes, K, budget, core)
                alloc_s = time.process_time() - start + curve_s
                add(
                    f"shared_basis {pct:g} %",
                    dict(zip(names, alloc.ranks, strict=True)),
                    core,
                    n,
                    alloc_s,
                )
    return points


def ours_points(aset: AdapterSet, heads: list[int] | None) -> list[dict[str, Any]]:
    """HydraOpt at every M in ``heads`` (None: 1..K) and every classic merge, via the library."""
    runs = [(name, {}, name) for name in CLASSIC_METHODS]
    heads = list(range(1, len(aset.tasks) + 1)) if heads is None else heads
    runs += [("hydraopt", {"heads": m, "head_scale": 1.0}, f"HydraOpt M={m}") for m in heads]
    points = []
    for method, options, label in runs:
        start = time.process_time()
        bundle = merge_adapter_set(aset, method, options)
        seconds = time.process_time() - start
        points.append(
            {
                "method": method,
                "label": label,
                "storage_percent": bundle.storage.storage_percent,
                "mae": mean_error(bundle),
                "seconds": seconds,
            }
        )
        print(f"{label}: S {points[-1]['storage_percent']:.1f} %, MAE {points[-1]['mae']:.4e}")
    return points


def best_basis_below(points: list[dict[str, Any]], other: dict[str, Any]) -> str:
    """The shared-basis point with no more storage and no more error than ``other``, if any."""
    for p in sorted(points, key=lambda p: p["mae"]):
        smaller = p["storage_percent"] <= other["storage_percent"]
        if p["method"] == "shared_basis" and smaller and p["mae"] <= other["mae"]:
            return p["label"]
    return "none"


def markdown(result: dict[str, Any]) -> str:
    lines = [
        f"Machine: {result['machine']}; commit {result['commit']}; {len(result['tasks'])} "
        f"adapters ({result['adapters']}), {result['modules']} modules; total {result['seconds']:.0f} s.",
        "",
        "| system | S % | MAE | CPU s | dominated by (shared_basis) |",
        "| --- | ---: | ---: | ---: | --- |",
    ]
    points = result["points"]
    for p in sorted(points, key=lambda p: (p["storage_percent"], p["mae"])):
        who = best_basis_below(points, p) if p["method"] != "shared_basis" else ""
        lines.append(
            f"| {p['label']} | {p['storage_percent']:.2f} | {p['mae']:.4e} | {p['seconds']:.1f} | {who} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    aset = load_adapter_set(args.adapters)
    if args.layers:
        layers = {int(x) for x in args.layers.split(",")}
        aset = aset.select([m.name for m in aset.modules if int(m.name.split(".")[2]) in layers])
    points = [] if args.skip_basis else basis_points(aset, args)
    if not args.skip_ours:
        points += ours_points(aset, args.heads)
    if not args.skip_peers:
        points += vlora_points(aset, None) + lorashare_points(aset, args.lorashare_k)
    result = {
        "machine": machine(),
        "commit": commit(),
        "adapters": " ".join(str(a) for a in args.adapters),
        "tasks": list(aset.tasks),
        "modules": len(aset.modules),
        "seconds": time.perf_counter() - start,
        "points": points,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "shared_basis_curve.json").write_text(json.dumps(result, indent=2) + "\n")
    table = markdown(result)
    (args.out / "shared_basis_curve.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
