"""Side-by-side merge times of ``shared_basis`` and HydraOpt through the CLI (issue 18).

Each point is one ``hydraopt merge`` child process, run in the order given (interleave the
methods so that both see the same machine). Reported per point: wall seconds, the child's CPU
seconds (user + system, from ``getrusage``: on a shared machine the wall clock measures the
neighbours), the bundle's own ``merge_seconds``, S % and the mean hard-routed error.

Usage (from the repo root, ``PYTHONPATH=src``):
    python benchmarks/shared_basis_speed.py ADAPTERS --out DIR \\
        --point "hydraopt M=1:--heads 1" --point "shared_basis 10 %:--method shared_basis --budget 10"
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shlex
import subprocess
import sys
import time
from pathlib import Path


def child_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_point(adapters: list[str], label: str, flags: list[str], out: Path) -> dict:
    bundle = out / label.replace(" ", "_").replace("%", "pct").replace("=", "")
    cmd = [sys.executable, "-m", "hydraopt.cli.main", "merge", *adapters, *flags]
    cmd += ["--out", str(bundle), "--force"]
    cpu0, wall0 = child_cpu(), time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    wall, cpu = time.perf_counter() - wall0, child_cpu() - cpu0
    if proc.returncode:
        raise SystemExit(f"{label}: merge failed\n{proc.stderr[-2000:]}")
    meta = json.loads((bundle / "bundle.json").read_text())
    errors = meta["extra"]["errors"]
    mean = sum(sum(v) / len(v) for v in errors.values()) / len(errors)
    ranks = sorted(m["rank"] for m in meta["modules"] if "rank" in m)
    point = {
        "label": label,
        "flags": flags,
        "wall_s": round(wall, 1),
        "cpu_s": round(cpu, 1),
        "merge_seconds": round(meta["extra"]["merge_seconds"], 1),
        "storage_percent": meta["storage"]["storage_percent"],
        "error": mean,
        "ranks": [ranks[0], ranks[len(ranks) // 2], ranks[-1]] if ranks else None,
    }
    print(
        f"{label}: wall {wall:.1f} s, CPU {cpu:.1f} s, S {point['storage_percent']:.2f} %, "
        f"{meta['extra']['error_distance']} {mean:.4e}",
        flush=True,
    )
    return point


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("adapters", nargs="+")
    p.add_argument("--point", action="append", required=True, help="LABEL:FLAGS (repeatable)")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    points = []
    for spec in args.point:
        label, _, flags = spec.partition(":")
        points.append(run_point(args.adapters, label, shlex.split(flags), args.out / "bundles"))
    result = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        "load_average": os.getloadavg(),
        "adapters": args.adapters,
        "points": points,
    }
    (args.out / "speed.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        "| system | S % | error | wall s | CPU s | R min/median/max |",
        "| --- | ---: | ---: | ---: | ---: | --- |",
    ]
    for pt in points:
        ranks = "/".join(map(str, pt["ranks"])) if pt["ranks"] else ""
        lines.append(
            f"| {pt['label']} | {pt['storage_percent']:.2f} | {pt['error']:.4e} | "
            f"{pt['wall_s']:.1f} | {pt['cpu_s']:.1f} | {ranks} |"
        )
    (args.out / "speed.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
