"""One decode step, side by side: the base model vs the runtime serving a mixed batch.

The quick check of the throughput ratio, without tokenizer, prefill or sampling: a random-weight
Llama at SmolLM2-135M shape (30 layers, 576 wide, q/k/v/o adapted at r = 32, synthetic M heads
over 5 tasks), B rows each with a KV cache of T positions, rows of all 5 tasks mixed; rounds
interleaved (each system once per round) so both see the same machine load, the 1-minute load
average recorded per round. Ratios per round (base time / runtime time) and their median.

Usage: python benchmarks/serving_step.py [--heads 2] [--rounds 20] [--batch 16] [--cache 80]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/ is not a package

from serving_memory import synthetic_factors  # noqa: E402


class _NoTokenizer:
    pad_token_id = 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--heads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--cache", type=int, default=80)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, help="write the result JSON here")
    args = p.parse_args(argv)
    from transformers import LlamaConfig, LlamaForCausalLM

    from hydraopt.runtime import RuntimeModel

    torch.set_num_threads(args.threads)
    config = LlamaConfig(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)  # random init draws from the global RNG; fixed for a repeatable model
    base = LlamaForCausalLM(config).eval()
    runtime = RuntimeModel(
        copy.deepcopy(base), _NoTokenizer(), synthetic_factors(base, 5, args.heads)
    )
    runtime.rows.ids = torch.arange(args.batch) % 5  # (B,) every task in the batch
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, config.vocab_size, (args.batch, args.cache), generator=gen)
    systems = {"base model": base, "runtime": runtime.model}
    caches = {}
    with torch.inference_mode():
        for name, model in systems.items():
            caches[name] = model(input_ids=prompt, use_cache=True, logits_to_keep=1).cache
    times: dict[str, list[float]] = {name: [] for name in systems}
    loads = []
    for r in range(args.rounds):
        loads.append(os.getloadavg()[0])
        token = torch.randint(0, config.vocab_size, (args.batch, 1), generator=gen)  # (B, 1)
        for name, model in systems.items():
            start = time.perf_counter()
            with torch.inference_mode():
                model(input_ids=token, cache=caches[name], use_cache=True, logits_to_keep=1)
            times[name].append(time.perf_counter() - start)
            for layer in caches[name].layers:  # back to T positions: every round alike
                layer.keys, layer.values = (
                    layer.keys[:, :, : args.cache],
                    layer.values[:, :, : args.cache],
                )
        print(f"round {r + 1}/{args.rounds}", file=sys.stderr, flush=True)
    ratios = [b / x for b, x in zip(times["base model"], times["runtime"], strict=True)]
    result = {
        "settings": vars(args) | {"out": str(args.out)},
        "seconds": times,
        "round_ratios": ratios,
        "median_ratio": statistics.median(ratios),
        "best_time_ratio": min(times["base model"]) / min(times["runtime"]),
        "load_average_1min_per_round": loads,
    }
    print(
        f"runtime / base model tokens/s, one decode step, B={args.batch}, M={args.heads}: "
        f"median of per-round ratios {result['median_ratio']:.3f}, best times "
        f"{result['best_time_ratio']:.3f}; load average {min(loads):.1f}-{max(loads):.1f}"
    )
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
