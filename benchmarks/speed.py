"""Speed and scale of the default merge, and side by side against the paper's own code.

For each shape x K x M it runs ``merge_adapter_set(aset, "hydraopt", {"heads": M})`` (the default
fast solver, result held in float16 as ``hydraopt merge`` holds it) in a fresh subprocess, so the
peak RSS (the child's own, :func:`peak_rss_bytes`) belongs to that run alone, and records wall
time, hard-routed MAE, peak RSS and its ratio to the adapters' size on disk. Shapes are the
synthetic ones of ``synthetic.py`` plus ``real`` (the five adapters of ../shared/adapters).
Configurations whose adapters or dense working set would not fit in the free disk or memory are
listed as skipped, with the estimate.

For K = 5 it also runs ``reference.py`` (the paper's appendix code, re-implemented faithfully) on
the first ``--ref-layers`` layers, in this process, with the same torch threads: its seconds per
epoch (timed over ``--ref-timed-epochs``, extrapolated to the paper's 1000 epochs and to the whole
model; only the reference is extrapolated), its hard-routed MAE after ``--ref-epochs`` epochs, and
ours on the same slice and on the whole model, with the ratios ours/reference.

Usage:
    python benchmarks/speed.py [--shapes ...] [--tasks K ...] [--heads 1 2 K] [--ref-layers 2]
        [--ref-epochs 1000] [--ref-timed-epochs 5] [--device cpu|cuda] [--out DIR] [--quick]
Writes OUT/speed.json and OUT/speed.md.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/ is not a package

from precision_path import PRECISION_CHOICES, cpu_record, describe, precision_path  # noqa: E402
from real_adapters import commit, machine  # noqa: E402
from reference import (  # noqa: E402
    ReferenceOptions,
    merged_error,
    reference_epoch_seconds,
    reference_merge,
)
from synthetic import (  # noqa: E402
    DEFAULT_CACHE,
    REAL_ADAPTERS,
    SHAPES,
    SyntheticSpec,
    ensure_adapters,
)

REPO = Path(__file__).resolve().parents[1]
PAPER_EPOCHS = 1000  # what the reference's time is extrapolated to (the paper's setting)
REFERENCE_K = 5  # the paper's main setting; the reference is too slow to run at larger K
DENSE_COPIES = 5  # (K, d, k) float32 buffers alive at the engine's peak: ΔW, the MAE work
# buffer, the hard-routed prediction and its difference, the final error pass (engine.py, refine.py)
QUICK = {
    "shapes": ["smollm2-135m", "real"],
    "tasks": [5],
    "heads": ["1", "2", "K"],
    "max_layers": 1,
    "ref_layers": 1,
    "ref_epochs": 100,
    "ref_timed_epochs": 2,
    "threads": 1,
}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--shapes", nargs="+", default=[*SHAPES, "real"], choices=[*SHAPES, "real"])
    p.add_argument("--tasks", nargs="+", type=int, default=[5, 40, 100, 500], help="K values")
    p.add_argument("--heads", nargs="+", default=["1", "2", "K"], help="M values; K means M = K")
    p.add_argument("--ref-layers", type=int, default=2, help="layers in the reference's slice")
    p.add_argument(
        "--ref-epochs",
        type=int,
        default=PAPER_EPOCHS,
        help="epochs of the reference run whose MAE is compared (0: time it only)",
    )
    p.add_argument("--ref-timed-epochs", type=int, default=5)
    p.add_argument("--max-layers", type=int, help="treat the first N layers as the whole model")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument(
        "--refine-precision",
        default="auto",
        choices=PRECISION_CHOICES,
        help="our merges' refine_precision (float32: the path of CPUs without fast bfloat16)",
    )
    p.add_argument("--threads", type=int, help="torch threads here and in each child")
    p.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="synthetic adapters")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    p.add_argument("--child-timeout", type=float, default=3600.0, help="seconds per merge run")
    p.add_argument("--quick", action="store_true", help=f"~1 minute smoke run: {QUICK}")
    p.add_argument("--child", help=argparse.SUPPRESS)  # internal: one merge run, JSON config
    args = p.parse_args(argv)
    if args.quick:
        # Quick values replace the defaults only: flags given explicitly still win.
        p.set_defaults(**QUICK)
        args = p.parse_args(argv)
    return args


def layer_of(module: str) -> int:
    return int(re.search(r"\.layers\.(\d+)\.", module).group(1))  # type: ignore[union-attr]


def peak_rss_bytes() -> int:
    """This process's own peak resident set size.

    On Linux from ``VmHWM`` in /proc/self/status: ``ru_maxrss`` carries the parent's high-water
    mark across fork + exec, so a merge run after the suite had run a reference (or written
    adapters) reported the parent's RSS when that was larger (measured: an 800 MiB parent made
    a bare child report 813 MiB; VmHWM said 13 MiB).
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass  # not Linux
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def child_main(config: dict[str, Any]) -> None:
    """One merge, measured; prints one JSON line (run in a fresh interpreter by :func:`run_child`)."""
    from hydraopt import load_adapter_set, merge_adapter_set
    from hydraopt.analysis import mean_error, relative_error
    from hydraopt.engine import EngineOptions

    torch.set_num_threads(config["threads"])
    after_import = peak_rss_bytes()
    aset = load_adapter_set(config["adapters"])
    if config["layers"] is not None:
        aset = aset.select([m.name for m in aset.modules if layer_of(m.name) < config["layers"]])
    # As `hydraopt merge` runs it: the result held in the bundle's default dtype (float16).
    engine = EngineOptions(seed=0, device=config["device"], result_dtype="float16")
    start = time.perf_counter()
    options = {
        "heads": config["heads"],
        "refine_precision": config["refine_precision"],
        "head_scale": 1.0,  # the paper objective: its error is compared with the reference loop's
    }
    bundle = merge_adapter_set(aset, "hydraopt", options, engine=engine)
    seconds = time.perf_counter() - start
    cuda_peak = torch.cuda.max_memory_allocated() if config["device"] == "cuda" else None
    print(
        json.dumps(
            {
                "seconds": seconds,
                "mae": mean_error(bundle),
                "relative_mae": relative_error(bundle),
                "storage_percent": bundle.storage["storage_percent"],
                "modules": len(aset.modules),
                "adapter_bytes": bundle.storage["adapters_bytes"],
                "peak_rss_bytes": peak_rss_bytes(),
                "rss_after_import_bytes": after_import,
                "cuda_peak_bytes": cuda_peak,
                "precision_path": precision_path(config["refine_precision"], config["device"]),
            }
        )
    )


def run_child(dirs: list[Path], heads: int, layers: int | None, args) -> dict[str, Any]:
    """Run :func:`child_main` in a subprocess; its JSON plus wall time, or the failure."""
    config = {
        "adapters": [str(d) for d in dirs],
        "heads": heads,
        "layers": layers,
        "device": args.device,
        "threads": args.threads or torch.get_num_threads(),
        "refine_precision": args.refine_precision,
    }
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(config)]
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.child_timeout)
    except subprocess.TimeoutExpired:
        return {"status": "failed", "reason": f"timed out after {args.child_timeout:.0f} s"}
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"status": "failed", "reason": f"exit {proc.returncode}: {tail}"}
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result.update(status="ok", wall_seconds=wall)
    return result


def heads_for(tokens: Sequence[str], num_tasks: int) -> list[int]:
    """M values from ``--heads`` (``K`` = num_tasks), deduplicated, those <= K."""
    values = [num_tasks if t.upper() == "K" else int(t) for t in tokens]
    return sorted({m for m in values if 1 <= m <= num_tasks})


def disk_bytes(dirs: Sequence[Path]) -> int:
    return sum(f.stat().st_size for d in dirs for f in Path(d).iterdir() if f.is_file())


def estimate_peak_bytes(module_shapes: Sequence[tuple[int, int]], num_tasks: int) -> int:
    """Dense working set of the largest module group (the engine holds one chunk at a time).

    With more adapters than a refinement step samples, the solver keeps the targets as factors
    and forms a block of tasks at a time, so the dense part stops growing with K.
    """
    from hydraopt.engine import DEFAULT_CHUNK_ELEMENTS
    from hydraopt.merge.hydraopt import HydraOptConfig
    from hydraopt.merge.measure import ERROR_BLOCK

    sampled = num_tasks > HydraOptConfig.refine_tasks
    dense_tasks = max(HydraOptConfig.refine_tasks, ERROR_BLOCK) if sampled else num_tasks
    largest = max(d * k for d, k in module_shapes)
    return DENSE_COPIES * 4 * max(DEFAULT_CHUNK_ELEMENTS, dense_tasks * largest)


def available_memory(device: str) -> int:
    if device == "cuda":
        return torch.cuda.mem_get_info()[0]
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def prepare(shape: str, num_tasks: int, args) -> tuple[list[Path] | None, str | None, int]:
    """Adapter dirs for (shape, K), or the reason to skip; and the model's layer count."""
    if shape == "real":
        dirs = sorted(p.parent for p in REAL_ADAPTERS.glob("*/adapter_config.json"))
        if len(dirs) != num_tasks:
            return None, f"{len(dirs)} real adapters, not K = {num_tasks}", 0
        from hydraopt import load_adapter_set

        modules = load_adapter_set(dirs, check_values=False).modules  # headers only
        layers = 1 + max(layer_of(m.name) for m in modules)
        return dirs, None, min(layers, args.max_layers or layers)
    spec = SyntheticSpec(SHAPES[shape], layers=args.max_layers)
    shapes = [(d, k) for _, d, k in spec.modules()]
    need_mem = estimate_peak_bytes(shapes, num_tasks)
    if need_mem > 0.8 * available_memory(args.device):
        return None, f"needs ~{need_mem / 2**30:.1f} GiB for dense (K, d, k) buffers", 0
    root = args.cache / spec.folder_name()
    have = disk_bytes([p for p in root.glob("task-*") if p.is_dir()]) if root.is_dir() else 0
    need_disk = num_tasks * spec.adapter_bytes() - have
    args.cache.mkdir(parents=True, exist_ok=True)
    if need_disk > 0.8 * shutil.disk_usage(args.cache).free:
        return None, f"needs {need_disk / 2**30:.1f} GiB more disk under {args.cache}", 0
    return ensure_adapters(spec, num_tasks, args.cache), None, spec.num_layers


def compare_reference(
    dirs: list[Path], heads: int, layers: int, ours_whole: dict[str, Any], args
) -> dict[str, Any]:
    """The reference on the first ``--ref-layers`` layers vs ours on that slice and on the whole."""
    from hydraopt import load_adapter_set

    slice_layers = min(args.ref_layers, layers)
    full = load_adapter_set(dirs, check_values=False)  # the child already checked the values
    aset = full.select([m.name for m in full.modules if layer_of(m.name) < slice_layers])
    ours_slice = (
        ours_whole if slice_layers == layers else run_child(dirs, heads, slice_layers, args)
    )
    options = ReferenceOptions(device=args.device)
    per_epoch = reference_epoch_seconds(aset, heads, args.ref_timed_epochs, options)
    ref_mae = run_seconds = None
    if args.ref_epochs > 0:  # 0: time only (at 3B shape 1000 epochs take 20-35 min per M)
        start = time.perf_counter()
        merged = reference_merge(aset, heads, args.ref_epochs, options)
        run_seconds = time.perf_counter() - start
        ref_mae = merged_error(aset, merged)
    ref_slice = per_epoch * PAPER_EPOCHS
    ref_whole = ref_slice * layers / slice_layers
    row = {
        "heads": heads,
        "slice_layers": slice_layers,
        "whole_layers": layers,
        "ref_seconds_per_epoch": per_epoch,
        "ref_seconds_1000_slice": ref_slice,
        "ref_seconds_1000_whole": ref_whole,
        "ref_epochs": args.ref_epochs,
        "ref_run_seconds": run_seconds,
        "ref_mae": ref_mae,
        "ours_slice_seconds": ours_slice.get("seconds"),
        "ours_whole_seconds": ours_whole.get("seconds"),
        "ours_slice_mae": ours_slice.get("mae"),
    }
    ok = ours_slice.get("status") == "ok" and ours_whole.get("status") == "ok"
    row["time_ratio_slice"] = ours_slice["seconds"] / ref_slice if ok else None
    row["time_ratio_whole"] = ours_whole["seconds"] / ref_whole if ok else None
    row["mae_ratio"] = ours_slice["mae"] / ref_mae if ok and ref_mae else None
    return row


def run_suite(args) -> dict[str, Any]:
    """Every configuration of ``args``; returns what speed.json holds."""
    if args.threads:
        torch.set_num_threads(args.threads)
    runs: list[dict[str, Any]] = []
    reference: list[dict[str, Any]] = []
    cpu = cpu_record(args.device)
    print(f"{describe(cpu)}; refinement path {precision_path(args.refine_precision, args.device)}")
    for shape in args.shapes:
        for num_tasks in [REFERENCE_K] if shape == "real" else args.tasks:
            base = {"shape": shape, "tasks": num_tasks}
            dirs, reason, layers = prepare(shape, num_tasks, args)
            if dirs is None:
                runs.append({**base, "status": "skipped", "reason": reason})
                print(f"{shape} K={num_tasks}: skipped ({reason})", flush=True)
                continue
            on_disk = disk_bytes(dirs)
            for heads in heads_for(args.heads, num_tasks):
                run = {**base, "heads": heads, "layers": layers, "disk_bytes": on_disk}
                run.update(run_child(dirs, heads, args.max_layers, args))
                if run["status"] == "ok":
                    run["rss_over_adapters"] = run["peak_rss_bytes"] / run["adapter_bytes"]
                    # What the merge itself added on top of Python + torch.
                    net = run["peak_rss_bytes"] - run["rss_after_import_bytes"]
                    run["net_rss_over_adapters"] = net / run["adapter_bytes"]
                runs.append(run)
                print(summary_line(run), flush=True)
                if num_tasks == REFERENCE_K and run["status"] == "ok":
                    row = {**base, **compare_reference(dirs, heads, layers, run, args)}
                    reference.append(row)
                    print(reference_line(row), flush=True)
    return {
        "machine": machine(),
        "torch_threads": torch.get_num_threads(),
        "commit": commit(),
        "device": args.device,
        **cpu,
        "refine_precision": args.refine_precision,
        "precision_path": precision_path(args.refine_precision, args.device),
        "options": {
            k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "child"
        },
        "runs": runs,
        "reference": reference,
    }


def summary_line(run: dict[str, Any]) -> str:
    head = f"{run['shape']} K={run['tasks']} M={run['heads']}"
    if run["status"] != "ok":
        return f"{head}: {run['status']} ({run['reason']})"
    return (
        f"{head} [{run['precision_path']}]: {run['seconds']:.2f} s, MAE {run['mae']:.3e}, peak RSS "
        f"{run['peak_rss_bytes'] / 2**20:.0f} MiB = {run['rss_over_adapters']:.1f}x adapters"
    )


def reference_line(row: dict[str, Any]) -> str:
    return (
        f"  reference ({row['slice_layers']} layers): {row['ref_seconds_per_epoch'] * 1e3:.1f} "
        f"ms/epoch, MAE {fmt(row['ref_mae'], '.3e')} after {row['ref_epochs']} epochs; "
        "ours/reference: "
        f"time {fmt(row['time_ratio_slice'], '.2e')} (slice), "
        f"{fmt(row['time_ratio_whole'], '.2e')} (whole), MAE {fmt(row['mae_ratio'], '.3f')}"
    )


def fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def markdown(result: dict[str, Any]) -> str:
    lines = [
        f"Machine: {result['machine']}; torch threads {result['torch_threads']}; "
        f"device {result['device']}; commit {result['commit']}.",
        "",
        f"CPU: {describe(result)}. Refinement products in {result['precision_path']} "
        f"(refine_precision {result['refine_precision']}).",
        "",
        "Adapters MiB: fp16 payload of the merged modules, all K (disk MiB: the K adapter dirs). "
        "Peak RSS: the merge subprocess's ru_maxrss; net: minus its RSS after importing torch.",
        "",
        "| shape | K | M | layers | merge s | wall s | MAE | S % | adapters MiB | disk MiB "
        "| peak RSS MiB | RSS/adapters | net RSS/adapters |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in result["runs"]:
        if r["status"] != "ok":
            lines.append(
                f"| {r['shape']} | {r['tasks']} | {r.get('heads', '-')} | {r['status']}: {r['reason']} |"
            )
            continue
        lines.append(
            f"| {r['shape']} | {r['tasks']} | {r['heads']} | {r['layers']} | {r['seconds']:.2f} | "
            f"{r['wall_seconds']:.1f} | {r['mae']:.3e} | {r['storage_percent']:.1f} | "
            f"{r['adapter_bytes'] / 2**20:.1f} | {r['disk_bytes'] / 2**20:.1f} | "
            f"{r['peak_rss_bytes'] / 2**20:.0f} | {r['rss_over_adapters']:.2f} | "
            f"{r['net_rss_over_adapters']:.2f} |"
        )
    lines += [
        "",
        f"Reference = the paper's appendix code (benchmarks/reference.py), K = {REFERENCE_K}; its time "
        f"is seconds/epoch x {PAPER_EPOCHS} epochs (x whole/slice layers for the whole model).",
        "",
        "| shape | M | slice layers | ref ms/epoch | ref s (1000 ep, slice) | ref s (1000 ep, whole) "
        "| ours s (slice) | ours s (whole) | ours/ref time (slice) | ours/ref time (whole) "
        "| ref MAE (ref epochs) | ours MAE | ours/ref MAE |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in result["reference"]:
        lines.append(
            f"| {r['shape']} | {r['heads']} | {r['slice_layers']} | "
            f"{r['ref_seconds_per_epoch'] * 1e3:.1f} | {r['ref_seconds_1000_slice']:.1f} | "
            f"{r['ref_seconds_1000_whole']:.1f} | {fmt(r['ours_slice_seconds'], '.2f')} | "
            f"{fmt(r['ours_whole_seconds'], '.2f')} | {fmt(r['time_ratio_slice'], '.2e')} | "
            f"{fmt(r['time_ratio_whole'], '.2e')} | {fmt(r['ref_mae'], '.3e')} ({r['ref_epochs']}) | "
            f"{fmt(r['ours_slice_mae'], '.3e')} | {fmt(r['mae_ratio'], '.3f')} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> dict[str, Any] | None:
    args = parse_args(argv)
    if args.child is not None:
        child_main(json.loads(args.child))
        return None
    result = run_suite(args)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "speed.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "speed.md").write_text(markdown(result))
    print(markdown(result))
    return result


if __name__ == "__main__":
    main()
