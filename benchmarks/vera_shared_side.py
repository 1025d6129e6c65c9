"""Which VeRA vector should HydraOpt share, λd or λb? Error and storage for M = 1..K, both ways.

Given a folder of PEFT VeRA adapters (one base model, one ``projection_prng_key``), merges them with
``hydraopt`` for every M and both ``--shared`` sides and reports, per run, the storage S % and
the hard-routed error (mean over tasks and modules; also relative to storing nothing, ΔW' = 0),
plus TA and TIES as the M = 1 baselines. Writes ``vera_shared_side.{json,md}``.

Until real VeRA adapters exist (examples/adapters-vera/), ``--synthetic DIR`` first *trains* K
small VeRAs with real PEFT on a tiny random Llama, one toy task each (next-token prediction on a
task-specific random bigram language), so that λb grows from zero and λd drifts from
``d_initial`` under real gradients rather than being drawn by hand. Only a stand-in: rerun on the
real adapters.

Usage:
    python benchmarks/vera_shared_side.py examples/adapters-vera --out benchmarks/results/vera
    python benchmarks/vera_shared_side.py --synthetic /tmp/vera-toy --out /tmp/vera-toy-result
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

from hydraopt import load_adapter_set, merge_adapter_set
from hydraopt.analysis import mean_error, relative_error
from hydraopt.engine import EngineOptions
from hydraopt.io.atomic import atomic_dir
from hydraopt.kinds.vera.load import VeraAdapterSet

SIDES = ("lambda_d", "lambda_b")
BASELINES = ("task_arithmetic", "ties")


def measure(
    aset: VeraAdapterSet, *, distance: str, refine_steps: int, seed: int
) -> list[dict[str, Any]]:
    """One row per (method, M, shared side): S %, error, relative error, seconds."""
    K = len(aset.tasks)
    engine = EngineOptions(seed=seed, error_distance=distance)
    runs: list[tuple[str, dict[str, Any]]] = [
        (
            "hydraopt",
            {"heads": m, "shared": side, "distance": distance, "refine_steps": refine_steps},
        )
        for m in range(1, K + 1)
        for side in SIDES
    ]
    runs += [(name, {}) for name in BASELINES]
    rows = []
    for method, options in runs:
        start = time.perf_counter()
        bundle = merge_adapter_set(aset, method, options, engine=engine)
        rows.append(
            {
                "method": method,
                "heads": options.get("heads", 1),
                "shared": options.get("shared", "-"),
                "storage_percent": bundle.storage["storage_percent"],
                "error": mean_error(bundle),  # type: ignore[arg-type]
                "relative_error": relative_error(bundle),  # type: ignore[arg-type]
                "seconds": time.perf_counter() - start,
            }
        )
        print(
            f"{method:16s} M={rows[-1]['heads']} shared={rows[-1]['shared']:8s} "
            f"S={rows[-1]['storage_percent']:6.2f}% rel={rows[-1]['relative_error']:.4f}",
            flush=True,
        )
    return rows


def markdown(rows: list[dict[str, Any]], distance: str, tasks: list[str]) -> str:
    lines = [
        f"VeRA adapters: {', '.join(tasks)}; hard-routed {distance}, mean over tasks and modules.",
        "",
        f"| method | M | shared | S % | {distance} | relative to ΔW'=0 |",
        "| --- | ---: | --- | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {r['method']} | {r['heads']} | {r['shared']} | {r['storage_percent']:.2f} "
            f"| {r['error']:.4e} | {r['relative_error']:.4f} |"
        )
    by_m = {}
    for r in rows:
        if r["method"] == "hydraopt":
            by_m.setdefault(r["heads"], {})[r["shared"]] = r["relative_error"]
    wins = sum(v["lambda_d"] < v["lambda_b"] for v in by_m.values())
    lines += ["", f"shared λd has the lower error at {wins} of {len(by_m)} values of M."]
    return "\n".join(lines) + "\n"


def train_toy_veras(out: Path, *, tasks: int, steps: int, rank: int, seed: int) -> list[Path]:
    """K VeRAs trained by PEFT on a tiny random Llama, one random bigram language per task."""
    from peft import VeraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    vocab = 48
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    torch.manual_seed(seed)  # transformers initialises from the global RNG; only here
    base_dir = out / "base"
    LlamaForCausalLM(config).save_pretrained(base_dir)
    dirs = []
    for t in range(tasks):
        gen = torch.Generator().manual_seed(seed * 1000 + t)
        # A peaked random bigram table: each token has a few likely successors, per task.
        logits = torch.randn(vocab, vocab, generator=gen) * 3.0
        probs = logits.softmax(-1)
        model = get_peft_model(
            LlamaForCausalLM.from_pretrained(base_dir),
            VeraConfig(r=rank, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
        )
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
        for _ in range(steps):
            seq = torch.empty(16, 24, dtype=torch.long)
            seq[:, 0] = torch.randint(vocab, (16,), generator=gen)
            for j in range(1, 24):
                seq[:, j] = torch.multinomial(probs[seq[:, j - 1]], 1, generator=gen)[:, 0]
            loss = model(input_ids=seq, labels=seq).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
        path = out / "adapters" / f"toy-{t}"
        model.save_pretrained(path)
        print(f"trained toy task {t}: final loss {loss.item():.3f}", flush=True)
        dirs.append(path)
    return dirs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("adapters", nargs="*", help="VeRA adapter dirs or a folder of them")
    p.add_argument("--out", type=Path, required=True, help="directory for the results")
    p.add_argument("--synthetic", type=Path, help="train toy VeRAs here first and measure them")
    p.add_argument("--tasks", type=int, default=5, help="--synthetic: number of toy tasks")
    p.add_argument("--steps", type=int, default=150, help="--synthetic: training steps per task")
    p.add_argument("--rank", type=int, default=16, help="--synthetic: VeRA r")
    p.add_argument("--distance", default="mae", choices=("mae", "mse", "fro", "cos"))
    p.add_argument("--refine-steps", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--base-model", help="base model dir (when the adapters' is not local)")
    p.add_argument("--force", action="store_true")
    p.add_argument(
        "--layers", help="comma-separated decoder layers to measure (default: every module)"
    )
    args = p.parse_args()
    paths = list(args.adapters)
    if args.synthetic is not None:
        paths = [
            str(d)
            for d in train_toy_veras(
                args.synthetic, tasks=args.tasks, steps=args.steps, rank=args.rank, seed=args.seed
            )
        ]
    if not paths:
        p.error("give VeRA adapter dirs or --synthetic DIR")
    aset = load_adapter_set(paths, base_model=args.base_model)
    if not isinstance(aset, VeraAdapterSet):
        p.error("these are not VeRA adapters")
    if args.layers:
        wanted = {f".layers.{int(x)}." for x in args.layers.split(",")}
        aset = aset.select([m.name for m in aset.modules if any(w in m.name for w in wanted)])
    rows = measure(aset, distance=args.distance, refine_steps=args.refine_steps, seed=args.seed)
    result = {
        "tasks": list(aset.tasks),
        "adapters": paths,
        "distance": args.distance,
        "refine_steps": args.refine_steps,
        "seed": args.seed,
        "layers": args.layers or "all",
        "rows": rows,
    }
    with atomic_dir(args.out, force=args.force) as tmp:
        (tmp / "vera_shared_side.json").write_text(json.dumps(result, indent=2) + "\n")
        (tmp / "vera_shared_side.md").write_text(markdown(rows, args.distance, list(aset.tasks)))
    print((args.out / "vera_shared_side.md").read_text())


if __name__ == "__main__":
    main()
