"""Serving a bundle vs PEFT: adapter memory held, mixed-task throughput, task switch, exactness.

One entry for four parts, each in its own module, all side by side on the same machine and commit
(the machine is shared: read the ratios, not the absolute numbers):

(a) memory (serving_memory.py): adapter tensor bytes and RSS growth, the runtime holding a bundle
    (M = 1, 2, K) vs PEFT holding the K adapters, K = 5 real and synthetic K = 20, 100.
(b) throughput and (c) task switch (serving_speed.py): generated tokens/s on a mixed workload,
    the runtime vs PEFT mixed batch, PEFT one task at a time and the base model; interleaved
    rounds, load average recorded.
(d) exactness (serving_exactness.py): greedy answers of ``hydraopt generate`` and of the server
    vs PEFT loading each task's export, ``--exact-prompts`` prompts per task, every bundle.
(e) margins (serving_margins.py, not run by default): on the prompts of (d), PEFT's top-1/top-2
    logit gap at every greedy step and the runtime's largest logit difference from PEFT.

Usage:
    python benchmarks/serving.py --bundle M1=DIR --bundle M2=DIR --bundle M5=DIR
        [--adapters examples/adapters] [--parts memory throughput exactness margins] [--out DIR]
        [--quick]
Writes OUT/serving.json, OUT/serving.md, OUT/serving-memory.png, OUT/serving-throughput.png
(serving_report.py).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/ is not a package

from real_adapters import commit, machine  # noqa: E402
from serving_exactness import measure_exactness  # noqa: E402
from serving_margins import measure_margins  # noqa: E402
from serving_memory import measure_memory  # noqa: E402
from serving_report import plot, write_report  # noqa: E402
from serving_speed import speed_parts  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TASKS_ROOT = REPO.parent / "shared" / "tasks"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--bundle", action="append", default=[], metavar="LABEL=DIR", help="bundles of the adapters"
    )
    p.add_argument("--adapters", type=Path, default=REPO / "examples" / "adapters")
    p.add_argument("--tasks-root", type=Path, default=TASKS_ROOT)
    p.add_argument("--synthetic-k", nargs="*", type=int, default=[20, 100])
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument(
        "--max-prompt-tokens", type=int, default=64, help="workload prompts at most this long"
    )
    p.add_argument(
        "--rounds", type=int, default=5, help="interleaved throughput rounds (best kept)"
    )
    p.add_argument("--exact-prompts", type=int, default=20)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    p.add_argument("--name", default="serving", help="OUT/NAME.json, OUT/NAME.md")
    p.add_argument(
        "--parts",
        nargs="+",
        default=["memory", "throughput", "exactness"],
        choices=["memory", "throughput", "exactness", "margins"],
        help="throughput includes the task switch",
    )
    p.add_argument("--quick", action="store_true", help="tiny sizes, to check the script runs")
    args = p.parse_args(argv)
    if args.quick:
        args.synthetic_k, args.requests, args.new_tokens = [20], 10, 4
        args.rounds, args.exact_prompts = 1, 2
    return args


# ---------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from hydraopt import export_peft_adapters, load_any_bundle
    from hydraopt.eval.model import load_base_model

    torch.set_num_threads(args.threads)
    bundles = {label: Path(d) for label, d in (b.split("=", 1) for b in args.bundle)}
    if not bundles:
        raise SystemExit("give at least one --bundle LABEL=DIR")
    tasks = sorted(d.name for d in args.adapters.iterdir() if (d / "adapter_config.json").is_file())
    args.out.mkdir(parents=True, exist_ok=True)
    main_label = next((k for k in bundles if "2" in k), next(iter(bundles)))
    result: dict[str, Any] = {
        "machine": machine(),
        "commit": commit(),
        "settings": f"torch threads {args.threads}, runtime bundle for (b)/(c): {main_label}",
        "load_average_start": os.getloadavg(),
    }

    def save() -> None:  # after every part, so an interrupted run keeps what it measured
        result["load_average_end"] = os.getloadavg()
        (args.out / f"{args.name}.json").write_text(json.dumps(result, indent=2) + "\n")

    with tempfile.TemporaryDirectory() as tmp:
        exports = {}
        for label, path in bundles.items():
            exports[label] = Path(tmp) / label
            export_peft_adapters(load_any_bundle(path), exports[label])
        base_model, tokenizer = load_base_model()
        if "memory" in args.parts:
            result["memory"] = measure_memory(args, bundles, exports, base_model, tokenizer)
            save()
        if "throughput" in args.parts:
            result.update(speed_parts(args, base_model, tokenizer, bundles[main_label], tasks))
            save()
        if "exactness" in args.parts:
            result["exactness"] = measure_exactness(
                args, base_model, tokenizer, bundles, exports, tasks
            )
            save()
        if "margins" in args.parts:
            result["margins"] = measure_margins(
                args, base_model, tokenizer, bundles, exports, tasks
            )
            save()
    write_report(result, args.out, args.name)
    plot(result, args.out)
    print((args.out / f"{args.name}.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
