"""Our default merge and the paper's reference loop, timed alternately in one process.

``speed.py`` runs each of our merges in a fresh subprocess (for peak RSS); on a machine shared
with other jobs its ratios drift with the load. This script interleaves the two on the same
adapters (reference seconds per epoch over ``--epochs`` epochs, then our whole default merge),
``--repeats`` times, so both see the same load. Only the reference is extrapolated (x 1000).

Usage: python benchmarks/side_by_side.py ADAPTER_DIR... [--heads 1 2 5] [--repeats 2]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from reference import ReferenceOptions, reference_epoch_seconds

from hydraopt import load_adapter_set, merge_adapter_set
from hydraopt.analysis import mean_error

PAPER_EPOCHS = 1000


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("adapters", nargs="+", type=Path)
    p.add_argument("--heads", type=int, nargs="+", default=[1, 2, 5])
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--epochs", type=int, default=3, help="reference epochs timed")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    aset = load_adapter_set(args.adapters)
    # Warm-up: first-use costs (allocator, kernels) belong to neither side.
    merge_adapter_set(aset.select([aset.modules[0].name]), "hydraopt", {"heads": 1})
    for _ in range(args.repeats):
        for m in args.heads:
            ref = reference_epoch_seconds(aset, m, args.epochs, ReferenceOptions()) * PAPER_EPOCHS
            start = time.perf_counter()
            bundle = merge_adapter_set(aset, "hydraopt", {"heads": m})
            ours = time.perf_counter() - start
            print(
                f"M={m}: reference {ref:.0f} s / {PAPER_EPOCHS} epochs, ours {ours:.1f} s "
                f"({ref / ours:.0f}x), ours MAE {mean_error(bundle):.6e}",
                flush=True,
            )


if __name__ == "__main__":
    main()
