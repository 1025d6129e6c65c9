"""Where a decode loop spends its time: our ``Decoder`` against transformers' ``generate``.

The real base model (``load_base_model``: the SmolLM2-135M GGUF), no adapter, B rows of short
prompts, exactly N new tokens (EOS ignored / suppressed, so both make the same count), greedy.
Rounds interleaved (each loop once per round) so both see the same machine load; the 1-minute
load average is recorded per round. One more run of each, with hooks on the model, splits its time into the
model's forward passes and everything else (the loop's own work: cache bookkeeping, masks,
position ids, logits processing, stopping checks), which is what differs between the two.

Usage: python benchmarks/serving_profile.py [--batch 16] [--new-tokens 32] [--rounds 3]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/ is not a package

from serving_speed import hf_generate  # noqa: E402


def forward_share(run: Callable[[], object], model: torch.nn.Module) -> tuple[float, float]:
    """(total seconds, seconds inside the model's forward passes) of one more run, timed by a
    pre-hook and a hook on the model itself (the same for both loops)."""
    inside = [0.0, 0.0]  # [start of the current pass, sum]

    def pre(*_: object) -> None:
        inside[0] = time.perf_counter()

    def post(*_: object) -> None:
        inside[1] += time.perf_counter() - inside[0]

    handles = [model.register_forward_pre_hook(pre), model.register_forward_hook(post)]
    start = time.perf_counter()
    run()
    total = time.perf_counter() - start
    for h in handles:
        h.remove()
    return total, inside[1]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, help="write the result JSON here")
    args = p.parse_args(argv)
    from hydraopt.eval.model import load_base_model
    from hydraopt.runtime import RuntimeModel, SamplingParams, SharedFactors, generate_batch

    torch.set_num_threads(args.threads)
    model, tokenizer = load_base_model()
    runtime = RuntimeModel(
        copy.deepcopy(model), tokenizer, SharedFactors(("base",), "", {}, "lora", "none")
    )
    prompts = [
        tokenizer(f"Question {i}: what is {'x ' * (i % 7)}?", add_special_tokens=False)["input_ids"]
        for i in range(args.batch)
    ]
    params = SamplingParams(max_new_tokens=args.new_tokens, ignore_eos=True)
    systems: dict[str, tuple[Callable[[], object], torch.nn.Module]] = {
        "our Decoder": (
            lambda: generate_batch(runtime, prompts, ["base"] * args.batch, [params] * args.batch),
            runtime.model,
        ),
        "transformers generate": (
            lambda: hf_generate(model, tokenizer, prompts, args.new_tokens),
            model,
        ),
    }
    times: dict[str, list[float]] = {k: [] for k in systems}
    loads = []
    for r in range(args.rounds):
        loads.append(os.getloadavg()[0])
        for name, (run, _) in systems.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
        print(f"round {r + 1}/{args.rounds}", file=sys.stderr, flush=True)
    split = {name: forward_share(run, m) for name, (run, m) in systems.items()}
    ratios = [
        d / g for d, g in zip(times["our Decoder"], times["transformers generate"], strict=True)
    ]
    result = {
        "settings": vars(args) | {"out": str(args.out)},
        "seconds": times,
        "round_ratios_decoder_over_generate": ratios,
        "median_ratio": statistics.median(ratios),
        "profiled_total_and_forward_s": split,
        "load_average_1min_per_round": loads,
    }
    for name, (total, inside) in split.items():
        print(
            f"{name}: {total:.2f} s profiled, {inside:.2f} s in forward passes, "
            f"{total - inside:.2f} s ({(total - inside) / total:.1%}) in the loop's own work"
        )
    print(
        f"Decoder time / generate time, B={args.batch}, {args.new_tokens} new tokens: median of "
        f"per-round ratios {result['median_ratio']:.3f} (rounds {', '.join(f'{x:.2f}' for x in ratios)}); "
        f"load average {min(loads):.1f}-{max(loads):.1f}"
    )
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
