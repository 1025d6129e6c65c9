"""Part (a) of benchmarks/serving.py: adapter memory held, the runtime (bundles M = 1, 2, K) vs
PEFT holding the K original adapters and the K exports; K = 5 real adapters and synthetic K = 20,
100 at SmolLM2-135M shape (r = 32 on q/k/v/o of 30 layers; a synthetic bundle has random A' and
heads of the right shapes: memory depends on shapes only). Each configuration runs in a child
forked from the process that holds the loaded base model, so RSS growth is that configuration's
own.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
from pathlib import Path
from typing import Any

import torch

RANK = 32


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
        del factors  # as load_model does: what stays is what the runtime holds
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
