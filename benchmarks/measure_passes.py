"""The refinement's closing measurements at 1B shape, old order vs one pass, in one process.

Old: the start's error, the last iterate's error and the zero yardstick, each its own pass over
the targets kept as factors (three formations of every ΔW_i). New: ``hard_routed_errors`` (one
formation, reused buffers). Checks the numbers are the same bit for bit and prints the ratio.

Usage: python benchmarks/measure_passes.py [--tasks 64] [--heads 1 2 K] [--repeats 3]
"""

from __future__ import annotations

import argparse
import time

import torch

from hydraopt.merge.measure import distance_to_zero, hard_routed_error, hard_routed_errors
from hydraopt.merge.targets import FactorTargets


def random_targets(K: int, shape: tuple[int, int, int], gen: torch.Generator) -> FactorTargets:
    """K random rank-r adapters of one (d, k) module kept as factors; prints the setting."""
    d, k, r = shape
    print(
        f"torch {torch.__version__}, {torch.backends.cpu.get_cpu_capability()}, K={K}, d k r={d, k, r}"
    )
    return FactorTargets(
        torch.randn(1, K, r, k, generator=gen) / k**0.5, torch.randn(1, K, d, r, generator=gen)
    )


def random_points(K: int, M: int, shape: tuple[int, int, int], gen: torch.Generator) -> tuple:
    """Routing (1, K) round robin over M heads, a random start (A', heads) and a nearby last
    iterate: the points a refinement's closing measurements compare."""
    d, k, r = shape
    routing = torch.arange(K)[None] % M
    start = (torch.randn(1, r, k, generator=gen) / k**0.5, torch.randn(1, M, d, r, generator=gen))
    return routing, start, (start[0] * 1.01, start[1] * 0.99)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tasks", type=int, default=64)
    p.add_argument("--heads", nargs="+", default=["1", "2", "K"])
    p.add_argument("--shape", type=int, nargs=3, default=[2048, 2048, 32], help="d k r")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    (d, k, r), K = args.shape, args.tasks
    gen = torch.Generator().manual_seed(0)
    targets = random_targets(K, (d, k, r), gen)
    for label in args.heads:
        M = K if label == "K" else int(label)
        routing, start, last = random_points(K, M, (d, k, r), gen)
        for rep in range(args.repeats):
            t0, c0 = time.perf_counter(), time.process_time()
            old = [hard_routed_error(targets, *pt, routing, "mae") for pt in (start, last)]
            old_zero = distance_to_zero(targets, "mae")
            t1, c1 = time.perf_counter(), time.process_time()
            new, new_zero = hard_routed_errors(
                targets, [start, last], routing, "mae", with_zero=True
            )
            t2, c2 = time.perf_counter(), time.process_time()
            same = all(
                torch.equal(x, y) for x, y in zip([*old, old_zero], [*new, new_zero], strict=True)
            )
            print(
                f"M={label} rep {rep}: three passes {t1 - t0:.2f} s (CPU {c1 - c0:.2f} s), one pass "
                f"{t2 - t1:.2f} s (CPU {c2 - c1:.2f} s): wall {(t1 - t0) / (t2 - t1):.2f}x, CPU "
                f"{(c1 - c0) / (c2 - c1):.2f}x, bit-identical {same}",
                flush=True,
            )


if __name__ == "__main__":
    main()
