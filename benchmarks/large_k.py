"""One default merge of many adapters, streamed: wall and CPU seconds, peak RSS, error, tensors.

For K = 1,000 at Llama-3.2-1B shape (RESULTS.md, issue 22). Uses only the public API
(``load_adapter_set`` is lazy, ``merge_adapter_set`` streams one chunk of modules at a time), so
the same script times an older checkout (``PYTHONPATH=/old/src``) back to back with this one, and
``--save`` writes every module's (A', heads, routing, errors, zero errors) for a bit-for-bit
comparison of the two (``--compare OLD.pt NEW.pt``).

Usage:
    python benchmarks/large_k.py ADAPTER_ROOT M [--precision auto|float32|bfloat16]
        [--result-dtype float16]
        [--threads 2] [--json OUT.json] [--save OUT.pt]
    python benchmarks/large_k.py --compare OLD.pt NEW.pt
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/ is not a package
from profile_merge import timed  # noqa: E402


def peak_rss_bytes() -> int:
    """This process's own high-water RSS (VmHWM), not a parent's inherited ru_maxrss."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def disk_bytes(paths: list[Path]) -> int:
    return sum(f.stat().st_size for p in paths for f in p.iterdir() if f.is_file())


def commit() -> str:
    import hydraopt

    src = Path(hydraopt.__file__).resolve().parents[2]
    run = subprocess.run(
        ["git", "-C", str(src), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    )
    return f"{run.stdout.strip()} ({src})"


# Solver functions timed with --phases (those this checkout has): module, name.
PHASES = [
    ("hydraopt.merge.hydraopt", "best_routing"),
    ("hydraopt.merge.hydraopt", "projected_heads"),
    ("hydraopt.merge.hydraopt", "distance_to_zero"),
    ("hydraopt.merge.hydraopt", "median_start"),
    ("hydraopt.merge.refine", "hard_routed_error"),
    ("hydraopt.merge.refine", "hard_routed_errors"),
    ("hydraopt.merge.refine", "mae_value_and_grads"),
    ("hydraopt.merge.refine", "take_targets"),
]


def time_phases(seconds: dict[str, float]) -> None:
    """Wrap each PHASES function so its wall seconds add up in ``seconds``."""
    import importlib

    for module_name, name in PHASES:
        module = importlib.import_module(module_name)
        f = getattr(module, name, None)
        if f is not None:
            key = f"{module_name.rsplit('.', 1)[-1]}.{name}"
            setattr(module, name, timed(seconds, key, f))


def merge_once(args: argparse.Namespace) -> None:
    from hydraopt import load_adapter_set, merge_adapter_set
    from hydraopt.engine_chunks import EngineOptions

    phases: dict[str, float] = {}
    if args.phases:
        time_phases(phases)

    torch.set_num_threads(args.threads)
    paths = sorted(args.root.glob("task-*"))
    start, cpu0 = time.perf_counter(), cpu_seconds()
    aset = load_adapter_set(paths)  # lazy: tensors are read per chunk
    K = len(aset.tasks)
    heads = K if args.heads == "K" else int(args.heads)
    load_before = os.getloadavg()
    bundle = merge_adapter_set(
        aset,
        "hydraopt",
        {"heads": heads, "refine_precision": args.precision},
        engine=EngineOptions(result_dtype=args.result_dtype),
        progress=True,
    )
    wall, cpu = time.perf_counter() - start, cpu_seconds() - cpu0
    errors = bundle.provenance.errors
    zero = bundle.provenance.zero_errors
    mae = sum(sum(v) for v in errors.values()) / sum(len(v) for v in errors.values())
    rel = sum(sum(v) for v in errors.values()) / sum(sum(v) for v in zero.values())
    adapters = disk_bytes(paths)
    record = {
        "root": str(args.root),
        "K": K,
        "M": heads,
        "modules": len(aset.modules),
        "precision": args.precision,
        "applied": bundle.config.get("refine_precision"),
        "threads": args.threads,
        "result_dtype": args.result_dtype or "float32",
        "commit": commit(),
        "wall_s": round(wall, 1),
        "cpu_s": round(cpu, 1),
        "peak_rss_mib": round(peak_rss_bytes() / 2**20, 1),
        "adapters_mib": round(adapters / 2**20, 1),
        "rss_over_adapters": round(peak_rss_bytes() / adapters, 3),
        "mae": mae,
        "relative_mae": rel,
        "loadavg_start": [round(x, 2) for x in load_before],
        "loadavg_end": [round(x, 2) for x in os.getloadavg()],
        "phases_s": {key: round(v, 1) for key, v in phases.items()},
    }
    print(json.dumps(record), flush=True)
    if args.json:
        args.json.write_text(json.dumps(record, indent=1) + "\n")
    if args.save:
        tensors = {
            name: (m.A, m.heads, m.routing, torch.tensor(errors[name]), torch.tensor(zero[name]))
            for name, m in bundle.merged.items()
        }
        torch.save(tensors, args.save)


def compare(old_path: Path, new_path: Path) -> None:
    old, new = torch.load(old_path), torch.load(new_path)
    labels = ("A'", "heads", "routing", "errors", "zero errors")
    same = {label: 0 for label in labels}
    worst = {label: 0.0 for label in labels}
    for name, old_t in old.items():
        for label, a, b in zip(labels, old_t, new[name], strict=True):
            if torch.equal(a, b):
                same[label] += 1
            diff = (a.double() - b.double()).abs().max().item()
            worst[label] = max(worst[label], diff / max(a.double().abs().max().item(), 1e-30))
    err_old = sum(t[3].sum().item() for t in old.values())
    err_new = sum(t[3].sum().item() for t in new.values())
    print(f"{len(old)} modules; bit-identical per tensor kind: {same}")
    print(f"largest relative difference: {worst}")
    print(f"summed MAE old {err_old:.9e} new {err_new:.9e} (new/old {err_new / err_old:.9f})")


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("root", type=Path, nargs="?", help="folder of task-* adapters")
    p.add_argument("heads", nargs="?", help="M, or K for M = K")
    p.add_argument("--precision", default="auto", choices=["auto", "float32", "bfloat16"])
    p.add_argument(
        "--result-dtype",
        choices=["float16", "bfloat16", "float32"],
        help="dtype the merged factors are held in until the bundle is built (default float32, "
        "the library's; `hydraopt merge` holds them in its --dtype, float16 by default)",
    )
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", type=Path)
    p.add_argument("--save", type=Path)
    p.add_argument("--phases", action="store_true", help="time the solver's phases")
    p.add_argument("--compare", nargs=2, type=Path, metavar=("OLD", "NEW"))
    args = p.parse_args()
    if args.compare:
        compare(*args.compare)
    elif args.root is None or args.heads is None:
        p.error("ADAPTER_ROOT and M are required")
    else:
        merge_once(args)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
