"""The closing measurements of many adapters at 1B shape: another checkout's vs this one's.

Times ``hard_routed_errors`` (two points and the zero yardstick, targets kept as factors) of an
older checkout's ``merge/measure.py`` (``--old-src``, loaded beside this one) against this
checkout's in one process, in CPU seconds, and prints the largest relative difference of the
errors. For RESULTS.md section 21 (issue 22): the cache-sized tiles against 8-task blocks.

Usage: python benchmarks/tiled_errors.py --old-src /tmp/old/src [--tasks 32] [--repeats 2]
"""

from __future__ import annotations

import argparse
import importlib.util
import time
from pathlib import Path

import torch
from measure_passes import random_points, random_targets  # the same problems, one definition

from hydraopt.merge import measure


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--old-src", type=Path, required=True, help="an older checkout's src/")
    p.add_argument("--tasks", type=int, default=32)
    p.add_argument("--shape", type=int, nargs=3, default=[2048, 2048, 32], help="d k r")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    spec = importlib.util.spec_from_file_location(
        "old_measure", args.old_src / "hydraopt" / "merge" / "measure.py"
    )
    assert spec is not None and spec.loader is not None
    old = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(old)
    torch.set_num_threads(args.threads)
    (d, k, r), K = args.shape, args.tasks
    gen = torch.Generator().manual_seed(0)
    targets = random_targets(K, (d, k, r), gen)
    for M in (1, 2, K):
        routing, start, last = random_points(K, M, (d, k, r), gen)
        for rep in range(args.repeats):
            c0 = time.process_time()
            want, want_zero = old.hard_routed_errors(
                targets, [start, last], routing, "mae", with_zero=True
            )
            c1 = time.process_time()
            got, zero = measure.hard_routed_errors(
                targets, [start, last], routing, "mae", with_zero=True
            )
            c2 = time.process_time()
            diff = max(
                ((x.double() - y.double()).abs() / y.double().abs()).max().item()
                for x, y in zip([*got, zero], [*want, want_zero], strict=True)
            )
            print(
                f"M={M} rep {rep}: old {c1 - c0:.2f} CPU s, new {c2 - c1:.2f} CPU s "
                f"({(c1 - c0) / (c2 - c1):.2f}x), largest relative difference {diff:.1e}",
                flush=True,
            )


if __name__ == "__main__":
    main()
