"""Serving a bundle vs PEFT: adapter memory held, mixed-task throughput, task switch, exactness.

All in one run, side by side, on the same machine and commit (the machine is shared: read the
ratios, not the absolute numbers):

(a) memory: adapter tensor bytes and process RSS growth of the runtime holding a bundle (M = 1, 2,
    K) vs PEFT holding the K original adapters (``load_adapter`` x K) and the K exports; K = 5 real
    adapters and synthetic K = 20, 100 at SmolLM2-135M shape (r = 32 on q/k/v/o of 30 layers;
    a synthetic bundle has random A' and heads of the right shapes: memory depends on shapes
    only). Each configuration runs in a child forked from the process that holds the loaded base
    model, so RSS growth is that configuration's own.
(b) throughput: generated tokens/s on a mixed workload (``--requests`` requests spread round-robin
    over the 5 tasks, batches of ``--batch``, exactly ``--new-tokens`` tokens each, EOS ignored so
    every system generates the same count): the runtime (mixed batches), PEFT's mixed-batch
    inference (``generate(adapter_names=...)``), PEFT one task at a time (``set_adapter``), and
    the base model with no adapter (the ceiling) through both decoders.
(c) task switch: what changing task costs: the runtime's per-row routing, PEFT ``set_adapter``,
    PEFT ``load_adapter`` + ``delete_adapter`` from disk.
(d) exactness: greedy answers of the runtime (mixed batches) vs PEFT loading each task's export,
    ``--exact-prompts`` prompts per task, for every bundle.

Usage:
    python benchmarks/serving.py --bundle M1=DIR --bundle M2=DIR --bundle M5=DIR
        [--adapters examples/adapters] [--out DIR] [--quick]
Writes OUT/serving.json, OUT/serving.md, OUT/serving-memory.png, OUT/serving-throughput.png
(serving_report.py).
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/ is not a package

from real_adapters import commit, machine  # noqa: E402
from serving_report import plot, write_report  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TASKS_ROOT = REPO.parent / "shared" / "tasks"
RANK = 32


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
    p.add_argument("--rounds", type=int, default=2, help="throughput rounds (best kept)")
    p.add_argument("--exact-prompts", type=int, default=20)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    p.add_argument(
        "--parts",
        nargs="+",
        default=["memory", "throughput", "exactness"],
        choices=["memory", "throughput", "exactness"],
        help="throughput includes the task switch",
    )
    p.add_argument("--quick", action="store_true", help="tiny sizes, to check the script runs")
    args = p.parse_args(argv)
    if args.quick:
        args.synthetic_k, args.requests, args.new_tokens = [20], 10, 4
        args.rounds, args.exact_prompts = 1, 2
    return args


# ---------------------------------------------------------------- (a) memory, in child processes
def rss() -> int:
    import psutil

    gc.collect()
    return int(psutil.Process().memory_info().rss)


def synthetic_factors(model: torch.nn.Module, K: int, M: int):
    """A bundle view with random A' (r, k) and M heads (M, d, r) for every q/k/v/o linear."""
    from hydraopt.runtime import ModuleFactors, SharedFactors

    gen = torch.Generator().manual_seed(0)
    modules = {}
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and name.rsplit(".", 1)[-1] in (
            "q_proj",
            "k_proj",
            "v_proj",
            "o_proj",
        ):
            a = torch.randn(RANK, m.in_features, generator=gen)
            heads = torch.randn(M, m.out_features, RANK, generator=gen)
            modules[name] = ModuleFactors(a, heads, torch.arange(K) % M)
    return SharedFactors(
        tuple(f"task-{i}" for i in range(K)), "synthetic", modules, "lora", "synthetic"
    )


def memory_child(spec: dict[str, Any], model, tokenizer) -> dict[str, Any]:
    """Install one configuration's adapters into ``model``; their tensor bytes and RSS growth."""
    before = rss()
    if spec["system"] == "runtime":
        from hydraopt.runtime import RuntimeModel, shared_factors

        factors = (
            shared_factors(spec["bundle"])
            if "bundle" in spec
            else synthetic_factors(model, spec["K"], spec["M"])
        )
        runtime = RuntimeModel(model, tokenizer, factors)
        tensor_bytes = runtime.adapter_bytes()
    else:
        from peft import LoraConfig, PeftModel, get_peft_model

        if "dirs" in spec:
            dirs = spec["dirs"]
            peft = PeftModel.from_pretrained(model, dirs[0], adapter_name="a0")
            for i, d in enumerate(dirs[1:], 1):
                peft.load_adapter(d, adapter_name=f"a{i}")
        else:  # synthetic: K adapters of rank 32 on q/k/v/o, as load_adapter would hold them
            config = LoraConfig(
                r=RANK, lora_alpha=2 * RANK, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]
            )
            peft = get_peft_model(model, config, adapter_name="a0")
            for i in range(1, spec["K"]):
                peft.add_adapter(f"a{i}", config)
        tensor_bytes = sum(
            p.numel() * p.element_size() for n, p in peft.named_parameters() if "lora_" in n
        )
    return {**spec, "tensor_bytes": tensor_bytes, "rss_growth": rss() - before}


def in_fork(spec: dict[str, Any], model, tokenizer) -> dict[str, Any]:
    """Run :func:`memory_child` in a forked child: it starts from the parent's loaded model
    (copy-on-write, already resident), so its RSS growth is that configuration's alone, and the
    base model is loaded once for every row."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        os.close(read)
        try:
            payload = json.dumps(memory_child(spec, model, tokenizer)).encode()
        except BaseException as e:  # report, never return into the parent's code
            payload = json.dumps({"error": repr(e)}).encode()
        with os.fdopen(write, "wb") as f:
            f.write(payload)
        os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as f:
        data = json.loads(f.read())
    os.waitpid(pid, 0)
    if "error" in data:
        raise RuntimeError(f"memory measurement {spec['label']} failed: {data['error']}")
    return data


def measure_memory(
    args: argparse.Namespace, bundles: dict[str, Path], exports: dict[str, Path], model, tokenizer
) -> list[dict[str, Any]]:
    tasks = sorted(d.name for d in args.adapters.iterdir() if (d / "adapter_config.json").is_file())
    specs: list[dict[str, Any]] = []
    from hydraopt.runtime import shared_factors

    for label, path in bundles.items():
        M = shared_factors(path).num_heads
        name = f"runtime M={'K' if len(tasks) == M else M} ({label})"
        specs.append({"K": len(tasks), "system": "runtime", "label": name, "bundle": str(path)})
    specs.append(
        {
            "K": len(tasks),
            "system": "peft",
            "label": "PEFT (K adapters, originals)",
            "dirs": [str(args.adapters / t) for t in tasks],
        }
    )
    first = next(iter(exports.values()))
    specs.append(
        {
            "K": len(tasks),
            "system": "peft",
            "label": "PEFT (K exports)",
            "dirs": [str(first / t) for t in tasks],
        }
    )
    for K in args.synthetic_k:
        for M in (1, 2, K):
            specs.append(
                {"K": K, "M": M, "system": "runtime", "label": f"runtime M={'K' if M == K else M}"}
            )
        specs.append({"K": K, "system": "peft", "label": "PEFT (K adapters, synthetic)"})
    out = []
    for spec in specs:
        print(f"memory: K={spec['K']} {spec['label']} ...", file=sys.stderr, flush=True)
        out.append(in_fork(spec, model, tokenizer))
    return out


# ---------------------------------------------------------------- workload
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


# ---------------------------------------------------------------- (b) throughput
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
    for r in range(args.rounds):  # interleaved rounds: every system sees the same machine load
        for name, run in systems.items():
            print(f"throughput round {r + 1}: {name} ...", file=sys.stderr, flush=True)
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    tokens = len(requests) * n
    return [
        {
            "system": k,
            "seconds": min(v),
            "all_seconds": v,
            "tokens": tokens,
            "tokens_per_s": tokens / min(v),
        }
        for k, v in times.items()
    ]


# ---------------------------------------------------------------- (c) task switch
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


# ---------------------------------------------------------------- (d) exactness
def measure_exactness(args, base_model, tokenizer, bundles, exports, tasks) -> list[dict[str, Any]]:
    from peft import PeftModel

    from hydraopt.eval.generate import generate
    from hydraopt.eval.tasks import build_prompt, load_split, load_task
    from hydraopt.runtime import RuntimeModel, shared_factors

    prompts = {}
    for t in tasks:
        spec = load_task(args.tasks_root / t)
        texts = [
            build_prompt(tokenizer, spec, ex.input)
            for ex in load_split(args.tasks_root / t, "test")
        ]
        prompts[t] = sorted(texts, key=len)[: args.exact_prompts]  # the shortest: decoding cost
    out = []
    for label, path in bundles.items():
        print(f"exactness: {label} ...", file=sys.stderr, flush=True)
        runtime = RuntimeModel(copy.deepcopy(base_model), tokenizer, shared_factors(path))
        # interleaved, so that every batch mixes all tasks
        flat = [(t, prompts[t][i]) for i in range(args.exact_prompts) for t in tasks]
        answers = runtime.generate(
            [p for _, p in flat],
            [t for t, _ in flat],
            max_new_tokens=args.new_tokens,
            chat=False,
            batch_size=args.batch,
        )
        got = [
            answers[i * len(tasks) + j]
            for j in range(len(tasks))
            for i in range(args.exact_prompts)
        ]
        peft = PeftModel.from_pretrained(
            copy.deepcopy(base_model), str(exports[label] / tasks[0]), adapter_name=tasks[0]
        )
        for t in tasks[1:]:
            peft.load_adapter(str(exports[label] / t), adapter_name=t)
        want = []
        for t in tasks:
            peft.set_adapter(t)
            want += generate(
                peft.eval(),
                tokenizer,
                prompts[t],
                args.new_tokens,
                batch_size=args.exact_prompts,
                progress=False,
            )
        equal = sum(a == b for a, b in zip(got, want, strict=True))
        out.append(
            {
                "bundle": label,
                "prompts": len(flat),
                "equal": equal,
                "per_task": len(prompts[tasks[0]]),
            }
        )
        del runtime, peft
        gc.collect()
    return out


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
    }

    def save() -> None:  # after every part, so an interrupted run keeps what it measured
        (args.out / "serving.json").write_text(json.dumps(result, indent=2) + "\n")

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
    write_report(result, args.out)
    plot(result, args.out)
    print((args.out / "serving.md").read_text())
    return 0


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


if __name__ == "__main__":
    sys.exit(main())
