"""Where a default merge spends its time: wall time per solver phase and the top cProfile lines.

Times the phases of HydraOpt's fast solver (routing / closed form, refinement, its error
evaluations and sampled targets, the zero-distance yardstick) by wrapping the functions the
solver calls, then prints cProfile's top self times. For large K (RESULTS.md section 16).

Usage: python benchmarks/profile_merge.py ADAPTER_ROOT M [auto|float32|bfloat16]
"""

from __future__ import annotations

import cProfile
import pstats
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import hydraopt.merge.hydraopt as solver
import hydraopt.merge.refine as refine_module
from hydraopt import load_adapter_set, merge_adapter_set

# Timed where this checkout has them (the zero yardstick and the closing errors share one pass,
# refine.hard_routed_errors, since RESULTS.md section 19).
PHASES = [
    (solver, "best_routing"),
    (solver, "projected_heads"),
    (solver, "distance_to_zero"),
    (solver, "refine"),
    (solver, "refine_measured"),
    (refine_module, "hard_routed_error"),
    (refine_module, "hard_routed_errors"),
    (refine_module, "mae_value_and_grads"),
    (refine_module, "take_targets"),
]


def timed(seconds: dict[str, float], key: str, f: Callable[..., Any]) -> Callable[..., Any]:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return f(*args, **kwargs)
        finally:
            seconds[key] = seconds.get(key, 0.0) + time.perf_counter() - start

    return wrapper


def main() -> None:
    root, heads = Path(sys.argv[1]), int(sys.argv[2])
    precision = sys.argv[3] if len(sys.argv) > 3 else "auto"
    torch.set_num_threads(2)
    start = time.perf_counter()
    aset = load_adapter_set(sorted(root.glob("task-*")))
    print(f"load {time.perf_counter() - start:.1f}s, K={len(aset.tasks)}", flush=True)
    seconds: dict[str, float] = {}
    for module, name in PHASES:
        if hasattr(module, name):
            key = f"{module.__name__.rsplit('.', 1)[-1]}.{name}"
            setattr(module, name, timed(seconds, key, getattr(module, name)))
    options = {"heads": heads, "refine_precision": precision}
    profile = cProfile.Profile()
    start = time.perf_counter()
    profile.enable()
    merge_adapter_set(aset, "hydraopt", options)
    profile.disable()
    total = time.perf_counter() - start
    print(f"M={heads} {options} merge {total:.1f}s", {k: round(v, 2) for k, v in seconds.items()})
    pstats.Stats(profile).sort_stats("tottime").print_stats(18)


if __name__ == "__main__":
    main()
