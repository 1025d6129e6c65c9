"""Parts (b) and (c) of benchmarks/serving.py: mixed-task throughput and the cost of a task switch.

(b) generated tokens/s on a mixed workload (``--requests`` requests spread round-robin over the
    tasks, batches of ``--batch``, exactly ``--new-tokens`` tokens each, EOS ignored so every
    system generates the same count): the runtime (mixed batches), PEFT's mixed-batch inference
    (``generate(adapter_names=...)``), PEFT one task at a time (``set_adapter``), and the base
    model with no adapter (the ceiling) through both decoders. Rounds are interleaved (every
    system once per round), so each sees the same machine load; the load average is recorded.
(c) task switch: the runtime's per-row routing, PEFT ``set_adapter``, PEFT ``load_adapter`` +
    ``delete_adapter`` from disk.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch


def workload(args: argparse.Namespace, tokenizer, tasks: list[str]) -> list[tuple[str, list[int]]]:
    """``--requests`` (task, prompt ids) pairs, round-robin over tasks, shortest prompts first."""
    from hydraopt.eval.tasks import build_prompt, load_split, load_task

    per_task = {}
    need = -(-args.requests // len(tasks))
    for t in tasks:
        spec = load_task(args.tasks_root / t)
        ids = [
            tokenizer(build_prompt(tokenizer, spec, ex.input), add_special_tokens=False)[
                "input_ids"
            ]
            for ex in load_split(args.tasks_root / t, "test")
        ]
        short = [x for x in ids if len(x) <= args.max_prompt_tokens] or sorted(ids, key=len)
        per_task[t] = (short * need)[:need]
    return [
        (tasks[j % len(tasks)], per_task[tasks[j % len(tasks)]][j // len(tasks)])
        for j in range(args.requests)
    ]


def hf_generate(model, tokenizer, prompts: list[list[int]], n: int, **kw) -> list[list[int]]:
    batch = tokenizer.pad({"input_ids": prompts}, padding=True, return_tensors="pt")
    with torch.inference_mode():
        out = model.generate(
            **batch,
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            **kw,
        )
    return out[:, batch["input_ids"].shape[1] :].tolist()


def measure_throughput(
    args, runtime, peft, base_runtime, tokenizer, requests
) -> list[dict[str, Any]]:
    from hydraopt.runtime import SamplingParams, generate_batch

    n, B = args.new_tokens, args.batch
    params = SamplingParams(max_new_tokens=n, ignore_eos=True)
    batches = [requests[i : i + B] for i in range(0, len(requests), B)]
    by_task: dict[str, list[list[int]]] = {}
    for task, ids in requests:
        by_task.setdefault(task, []).append(ids)

    def ours(rt):
        for batch in batches:
            generate_batch(
                rt, [ids for _, ids in batch], [t for t, _ in batch], [params] * len(batch)
            )

    def peft_mixed():
        for batch in batches:
            hf_generate(
                peft, tokenizer, [ids for _, ids in batch], n, adapter_names=[t for t, _ in batch]
            )

    def peft_one_task():
        for task, prompts in by_task.items():
            peft.set_adapter(task)
            for i in range(0, len(prompts), B):
                hf_generate(peft, tokenizer, prompts[i : i + B], n)

    def base_hf():
        with peft.disable_adapter():
            for batch in batches:
                hf_generate(peft, tokenizer, [ids for _, ids in batch], n)

    systems = {
        "base model, our decoder (ceiling)": lambda: ours(base_runtime),
        "runtime, mixed batches": lambda: ours(runtime),
        "base model, transformers generate": base_hf,
        "PEFT mixed batch (adapter_names=)": peft_mixed,
        "PEFT one task at a time (set_adapter)": peft_one_task,
    }
    times: dict[str, list[float]] = {k: [] for k in systems}
    loads: list[float] = []
    for r in range(args.rounds):  # interleaved rounds: every system sees the same machine load
        loads.append(os.getloadavg()[0])
        # rotate the order each round: the first system of a round measured slower than its
        # place in an isolated A/B said (RESULTS.md 7(f)), so no system is always first
        names = list(systems)
        for name in names[r % len(names) :] + names[: r % len(names)]:
            run = systems[name]
            print(f"throughput round {r + 1}: {name} ...", file=sys.stderr, flush=True)
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    tokens = len(requests) * n
    ceiling = times["base model, our decoder (ceiling)"]
    return [
        {
            "system": k,
            "seconds": min(v),
            "all_seconds": v,
            "tokens": tokens,
            "tokens_per_s": tokens / min(v),
            # per round, against the ceiling measured in the same round: less exposed to load
            # swings than the best times, which may come from different rounds
            "round_ratios": [c / x for c, x in zip(ceiling, v, strict=True)],
            "median_round_ratio": statistics.median(c / x for c, x in zip(ceiling, v, strict=True)),
            "load_average_1min_per_round": loads,
        }
        for k, v in times.items()
    ]


def measure_switch(runtime, peft, adapters: Path, tasks: list[str]) -> dict[str, float]:
    reps = 2000
    start = time.perf_counter()
    for i in range(reps):
        with runtime.routed([tasks[i % len(tasks)]]):
            pass
    routed = (time.perf_counter() - start) / reps
    start = time.perf_counter()
    for i in range(200):
        peft.set_adapter(tasks[i % len(tasks)])
    set_adapter = (time.perf_counter() - start) / 200
    swaps = 3
    start = time.perf_counter()
    for i in range(swaps):
        peft.load_adapter(str(adapters / tasks[i % len(tasks)]), adapter_name="swap")
        peft.set_adapter("swap")
        peft.delete_adapter("swap")
        peft.set_adapter(tasks[0])
    load = (time.perf_counter() - start) / swaps
    return {
        "runtime_route_s": routed,
        "peft_set_adapter_s": set_adapter,
        "peft_load_adapter_s": load,
    }


def speed_parts(args, base_model, tokenizer, bundle: Path, tasks: list[str]) -> dict[str, Any]:
    """(b) and (c): the runtime, the base model and PEFT holding the originals, side by side."""
    from peft import PeftModel

    from hydraopt.runtime import RuntimeModel, SharedFactors, shared_factors

    runtime = RuntimeModel(copy.deepcopy(base_model), tokenizer, shared_factors(bundle))
    no_modules = SharedFactors(tuple(tasks), "", {}, "lora", "none")
    base_runtime = RuntimeModel(copy.deepcopy(base_model), tokenizer, no_modules)
    peft = PeftModel.from_pretrained(
        copy.deepcopy(base_model), str(args.adapters / tasks[0]), adapter_name=tasks[0]
    )
    for t in tasks[1:]:
        peft.load_adapter(str(args.adapters / t), adapter_name=t)
    peft.eval()
    requests = workload(args, tokenizer, tasks)
    mean_prompt = statistics.mean(len(ids) for _, ids in requests)
    return {
        "workload": f"{len(requests)} requests round-robin over {len(tasks)} tasks, batches of "
        f"{args.batch}, {args.new_tokens} new tokens each, prompts {mean_prompt:.0f} tokens on "
        f"average; best of {args.rounds} interleaved rounds",
        "workload_short": f"{len(requests)} requests, {len(tasks)} tasks, batch {args.batch}",
        "throughput": measure_throughput(args, runtime, peft, base_runtime, tokenizer, requests),
        "switch": measure_switch(runtime, peft, args.adapters, tasks),
    }
