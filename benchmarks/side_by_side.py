"""Our default merge and the paper's reference loop, timed alternately in one process.

``speed.py`` runs each of our merges in a fresh subprocess (for peak RSS); on a machine shared
with other jobs its ratios drift with the load. This script interleaves the two on the same
adapters (reference seconds per epoch over ``--epochs`` epochs, then our whole default merge on
each ``--refine-precision`` path), ``--repeats`` times, so both see the same load. Only the
reference is extrapolated (x 1000).

``--refine-precision float32`` runs the refinement's products in float32, the path every CPU
without fast bfloat16 (AVX2-only x86, ARM) takes by default: any machine can reproduce those
figures. Each line and the ``--json`` record say which path ran and on what CPU.

Usage: python benchmarks/side_by_side.py ADAPTER_DIR... [--heads 1 2 5] [--repeats 2]
    [--refine-precision auto float32] [--ref-mae-epochs 1000] [--json OUT.json]
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from precision_path import PRECISION_CHOICES, cpu_record, describe, precision_path
from real_adapters import commit, machine
from reference import ReferenceOptions, merged_error, reference_epoch_seconds, reference_merge

from hydraopt import load_adapter_set, merge_adapter_set
from hydraopt.analysis import mean_error

PAPER_EPOCHS = 1000


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("adapters", nargs="+", type=Path)
    p.add_argument("--heads", type=int, nargs="+", default=[1, 2, 5])
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--epochs", type=int, default=3, help="reference epochs timed")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--refine-precision",
        nargs="+",
        default=["auto"],
        choices=PRECISION_CHOICES,
        help="our merge's refine_precision, each one timed after the same reference timing",
    )
    p.add_argument(
        "--ref-mae-epochs",
        type=int,
        default=0,
        help="also run the reference this many epochs (once per M) and print its hard-routed MAE",
    )
    p.add_argument("--json", type=Path, help="write every line's numbers here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    record: dict[str, Any] = {
        "machine": machine(),
        "commit": commit(),
        "options": json.loads(json.dumps(vars(args), default=str)),  # paths as text
        **cpu_record(),
        "rows": [],
        "reference_mae": {},
    }
    print(f"# {record['machine']}; commit {record['commit']}; {describe(record)}", flush=True)
    aset = load_adapter_set(args.adapters)
    # Warm-up: first-use costs (allocator, kernels) belong to neither side.
    for precision in args.refine_precision:
        one = aset.select([aset.modules[0].name])
        merge_adapter_set(
            one, "hydraopt", {"heads": 1, "refine_precision": precision, "head_scale": 1.0}
        )
    for m in args.heads if args.ref_mae_epochs > 0 else []:
        merged = reference_merge(aset, m, args.ref_mae_epochs, ReferenceOptions())
        record["reference_mae"][str(m)] = mae = merged_error(aset, merged)
        print(f"M={m}: reference MAE {mae:.6e} after {args.ref_mae_epochs} epochs", flush=True)
    for _ in range(args.repeats):
        for m in args.heads:
            ref = reference_epoch_seconds(aset, m, args.epochs, ReferenceOptions()) * PAPER_EPOCHS
            for precision in args.refine_precision:
                start = time.perf_counter()
                bundle = merge_adapter_set(
                    aset, "hydraopt", {"heads": m, "refine_precision": precision, "head_scale": 1.0}
                )
                ours = time.perf_counter() - start
                row = {
                    "heads": m,
                    "refine_precision": precision,
                    "precision_path": precision_path(precision),
                    "reference_seconds": ref,
                    "ours_seconds": ours,
                    "ratio": ref / ours,
                    "ours_mae": mean_error(bundle),
                }
                record["rows"].append(row)
                print(
                    f"M={m} [{row['precision_path']}]: reference {ref:.0f} s / {PAPER_EPOCHS} "
                    f"epochs, ours {ours:.1f} s ({ref / ours:.0f}x), ours MAE "
                    f"{row['ours_mae']:.6e}",
                    flush=True,
                )
    if args.json is not None:
        record["load_average_end"] = cpu_record()["load_average"]
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(record, indent=2) + "\n")
    return record


if __name__ == "__main__":
    main()
