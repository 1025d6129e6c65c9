"""HydraOpt's default (fast) solver vs the paper-faithful solver on real adapters, side by side.

For every M it runs, on the same adapters and modules, in one process:
  - ``fast``: the library default (closed form + hard routing + MAE refinement),
  - ``closed``: the closed form and routing only (``refine_steps=0``),
  - ``paper``: the paper's algorithm (soft routing, AdamW lr 0.01, 1000 epochs),
and the classic baselines, then prints wall time and hard-routed MAE (mean over tasks and
modules) with the ratios fast/paper. Results go to OUT/real_adapters.{json,md}.

Usage: python benchmarks/real_adapters.py [--adapters DIR...] [--layers 0,15,29] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import time
from pathlib import Path

import torch

from hydraopt import load_adapter_set, merge_adapter_set
from hydraopt.analysis import mean_error, relative_error
from hydraopt.merge.classic import CLASSIC_METHODS

REPO = Path(__file__).resolve().parents[1]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    default = sorted((REPO.parent / "shared" / "adapters").glob("en-*"))
    p.add_argument("--adapters", nargs="+", type=Path, default=default)
    p.add_argument("--layers", help="comma-separated layer indices (default: all)")
    p.add_argument("--heads", type=int, nargs="+", help="M values (default 1..K)")
    p.add_argument("--epochs", type=int, default=1000, help="paper solver epochs")
    p.add_argument("--skip-paper", action="store_true")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    return p.parse_args()


def machine() -> str:
    cpu = "unknown cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {torch.get_num_threads()} torch threads, {platform.system()} {platform.release()}, torch {torch.__version__}"


def commit() -> str:
    try:
        return subprocess.check_output(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, text=True
        ).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def run(aset, method: str, options: dict) -> dict:
    start = time.perf_counter()
    bundle = merge_adapter_set(aset, method, options)
    seconds = time.perf_counter() - start
    return {
        "method": method,
        "options": options,
        "seconds": seconds,
        "mae": mean_error(bundle),
        "relative_mae": relative_error(bundle),
        "storage_percent": bundle.storage["storage_percent"],
    }


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    aset = load_adapter_set(args.adapters)
    if args.layers:
        layers = {int(x) for x in args.layers.split(",")}
        aset = aset.select([m.name for m in aset.modules if int(m.name.split(".")[2]) in layers])
    K = len(aset.tasks)
    rows = []
    for m in args.heads or range(1, K + 1):
        row = {"heads": m}
        row["fast"] = run(aset, "hydraopt", {"heads": m, "head_scale": 1.0})
        row["closed"] = run(aset, "hydraopt", {"heads": m, "refine_steps": 0, "head_scale": 1.0})
        if not args.skip_paper:
            row["paper"] = run(
                aset, "hydraopt", {"heads": m, "solver": "paper", "epochs": args.epochs}
            )
        rows.append(row)
        print(
            json.dumps(
                {
                    k: (v if k == "heads" else {kk: v[kk] for kk in ("seconds", "mae")})
                    for k, v in row.items()
                }
            ),
            flush=True,
        )
    baselines = [run(aset, name, {}) for name in CLASSIC_METHODS]
    result = {
        "machine": machine(),
        "commit": commit(),
        "tasks": list(aset.tasks),
        "modules": len(aset.modules),
        "layers": args.layers or "all",
        "paper_epochs": args.epochs,
        "hydraopt": rows,
        "baselines": baselines,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "real_adapters.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "real_adapters.md").write_text(markdown(result))
    print(markdown(result))


def markdown(result: dict) -> str:
    lines = [
        f"Machine: {result['machine']}; commit {result['commit']}; {len(result['tasks'])} adapters, "
        f"{result['modules']} modules (layers: {result['layers']}); paper solver {result['paper_epochs']} epochs.",
        "",
        "| M | S % | fast MAE | fast s | closed-form MAE | closed s | paper MAE | paper s | fast/paper MAE | paper/fast time |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in result["hydraopt"]:
        f, c, p = row["fast"], row["closed"], row.get("paper")
        paper_cells = (
            f"{p['mae']:.4e} | {p['seconds']:.1f} | {f['mae'] / p['mae']:.4f} | {p['seconds'] / f['seconds']:.1f}x"
            if p
            else "- | - | - | -"
        )
        lines.append(
            f"| {row['heads']} | {f['storage_percent']:.0f} | {f['mae']:.4e} | {f['seconds']:.1f} | "
            f"{c['mae']:.4e} | {c['seconds']:.1f} | {paper_cells} |"
        )
    lines += [
        "",
        "| baseline | S % | MAE | relative to ΔW'=0 | s |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for b in result["baselines"]:
        lines.append(
            f"| {b['method']} | {b['storage_percent']:.0f} | {b['mae']:.4e} | {b['relative_mae']:.3f} | {b['seconds']:.1f} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
