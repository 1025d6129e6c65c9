"""HydraOpt against the peers a user would pick instead, on the same adapters: storage vs error.

Peers:
  - ``vlora-dev`` (PyPI, ``vlora.SharedSubspace``): per module, one mean plus n shared SVD
    components for the flattened A's and, separately, for the B's; each task keeps 2 n loadings.
    Run exactly as its README shows (``SharedSubspace.from_adapters(adapters, num_components=n)``,
    then ``reconstruct(task)``), n = 1 .. K-1 (n = K-1 reproduces every adapter: 100 % storage).
  - ``lorashare`` (PyPI 0.1.3, ``lorashare.SHAREModel``, SHARE): per module and side, k shared
    PCA components of the stacked (oriented) A's, and of the B's; each task keeps k x r loadings
    per side. Run as its README shows (``SHAREModel.from_adapters({name: dir}, num_components=k)``,
    then ``reconstruct(name)``), k in ``--lorashare-k``.
  - PEFT-style classic merges (``hydraopt.merge.classic``, proven equal to PEFT's
    ``add_weighted_adapter`` in tests/integration): TA and TIES, one adapter for all tasks.
  - HydraOpt M = 1 .. K (default options).

Error = mean over tasks and modules of MAE(ΔW_i, deployed ΔW'_i), scale included — the measure
every bundle records. Storage = parameters kept / parameters of the K separate adapters, counted
exactly for each method (vlora: means + components + loadings; lorashare: components +
loadings).

``--export DIR`` also writes vlora's reconstructions as PEFT LoRA dirs (``DIR/n<n>/<task>``, the
original adapter_config.json, fp16 like the inputs) so ``hydraopt evaluate --system
lora=DIR/n<n>`` scores them on the tasks.

Usage: python benchmarks/peers.py [--adapters DIR...] [--out DIR] [--export DIR]
Writes OUT/peers.{json,md,png}.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from hydraopt import load_adapter_set, merge_adapter_set
from hydraopt.analysis import mean_error, plot_tradeoff
from hydraopt.io.peft import AdapterSet

REPO = Path(__file__).resolve().parents[1]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    default = sorted((REPO.parent / "shared" / "adapters").glob("en-*"))
    p.add_argument("--adapters", nargs="+", type=Path, default=default)
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "peers")
    p.add_argument("--export", type=Path, help="write vlora reconstructions as PEFT dirs here")
    p.add_argument("--lorashare-k", type=int, nargs="+", default=[4, 8, 16, 32])
    p.add_argument("--threads", type=int, default=None)
    return p.parse_args()


def vlora_points(aset: AdapterSet, export: Path | None) -> list[dict[str, Any]]:
    """vlora-dev at every n: its storage and the MAE of its reconstructed ΔW."""
    from vlora import SharedSubspace, load_adapter

    dirs = [info.path for info in aset.adapters]
    adapters = [load_adapter(d) for d in dirs]
    for ad in adapters:
        # vlora-dev 1.0.0 runs torch.linalg.svd on the tensors as loaded, which fails on fp16
        # (the dtype PEFT saves by default): upcast, as a user would have to.
        ad.lora_a = {n: t.float() for n, t in ad.lora_a.items()}
        ad.lora_b = {n: t.float() for n, t in ad.lora_b.items()}
    K = len(adapters)
    names = [m.name for m in aset.modules]
    originals = {spec.name: aset.load_stack([spec]) for spec in aset.modules}  # factors: small
    points = []
    for n in range(1, K):
        start = time.perf_counter()
        sub = SharedSubspace.from_adapters(adapters, task_ids=list(aset.tasks), num_components=n)
        seconds = time.perf_counter() - start
        kept = 0
        for name in names:
            kept += sub.means_a[name].numel() + sub.means_b[name].numel()
            kept += sub.components_a[name].numel() + sub.components_b[name].numel()
            for task in aset.tasks:
                proj = sub.tasks[task]
                kept += proj.loadings_a[name].numel() + proj.loadings_b[name].numel()
        errors = []
        for i, task in enumerate(aset.tasks):
            rec = sub.reconstruct(task)
            stack_errors = []
            for spec in aset.modules:
                stack = originals[spec.name]
                scale = stack.scale[0, i]
                delta = scale * stack.B[0, i] @ stack.A[0, i]  # (d, k)
                approx = scale * rec.lora_b[spec.name].float() @ rec.lora_a[spec.name].float()
                stack_errors.append(float((delta - approx).abs().mean()))
            errors.append(sum(stack_errors) / len(stack_errors))
            if export is not None:
                write_peft(aset, i, rec, export / f"n{n}" / task)
        full = sum(len(aset.tasks) * m.r * (m.d + m.k) for m in aset.modules)
        points.append(
            {
                "method": "vlora",
                "label": f"vlora n={n}",
                "storage_percent": 100.0 * kept / full,
                "mae": sum(errors) / len(errors),
                "seconds": seconds,
            }
        )
        print(f"vlora n={n}: S {points[-1]['storage_percent']:.1f} %, MAE {points[-1]['mae']:.4e}")
    return points


def lorashare_points(aset: AdapterSet, ks: list[int]) -> list[dict[str, Any]]:
    """lorashare (SHARE) at every k in ``ks``: its storage and the MAE of its reconstructed ΔW."""
    from lorashare import SHAREModel

    originals = {spec.name: aset.load_stack([spec]) for spec in aset.modules}
    full = sum(len(aset.tasks) * m.r * (m.d + m.k) for m in aset.modules)
    points = []
    for k in ks:
        start = time.perf_counter()
        share = SHAREModel.from_adapters(
            {task: str(info.path) for task, info in zip(aset.tasks, aset.adapters, strict=True)},
            num_components=k,
            device="cpu",
        )
        seconds = time.perf_counter() - start
        kept = sum(t.numel() for t in share.components.values())
        kept += sum(t.numel() for per in share.all_loadings.values() for t in per.values())
        errors = []
        for i, task in enumerate(aset.tasks):
            rec = share.reconstruct(task)  # PEFT keys, lora_A (r, k) and lora_B (d, r)
            per_module = []
            for spec in aset.modules:
                stack = originals[spec.name]
                scale = stack.scale[0, i]
                delta = scale * stack.B[0, i] @ stack.A[0, i]  # (d, k)
                key = f"base_model.model.{spec.name}.lora_"
                approx = scale * rec[key + "B.weight"].float() @ rec[key + "A.weight"].float()
                per_module.append(float((delta - approx).abs().mean()))
            errors.append(sum(per_module) / len(per_module))
        points.append(
            {
                "method": "lorashare",
                "label": f"lorashare k={k}",
                "storage_percent": 100.0 * kept / full,
                "mae": sum(errors) / len(errors),
                "seconds": seconds,
            }
        )
        print(
            f"lorashare k={k}: S {points[-1]['storage_percent']:.1f} %, MAE {points[-1]['mae']:.4e}"
        )
    return points


def write_peft(aset: AdapterSet, i: int, rec: Any, out: Path) -> None:
    """The original adapter dir of task i with its factors replaced by ``rec``'s (same keys)."""
    info = aset.adapters[i]
    tensors = load_file(str(info.weights_file))
    for key, value in tensors.items():
        for side, table in (("lora_A", rec.lora_a), ("lora_B", rec.lora_b)):
            marker = f".{side}."
            if marker in key:
                module = key.split(marker)[0].removeprefix("base_model.model.")
                tensors[key] = table[module].to(value.dtype).contiguous()
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "adapter_model.safetensors"))
    shutil.copy(info.path / "adapter_config.json", out / "adapter_config.json")


def ours_points(aset: AdapterSet) -> list[dict[str, Any]]:
    """HydraOpt M = 1..K and the classic TA / TIES, through the library's one entry point."""
    runs = [("task_arithmetic", {}, "TA"), ("ties", {}, "TIES")]
    runs += [
        ("hydraopt", {"heads": m, "head_scale": 1.0}, f"HydraOpt M={m}")
        for m in range(1, len(aset.tasks) + 1)
    ]
    points = []
    for method, options, label in runs:
        start = time.perf_counter()
        bundle = merge_adapter_set(aset, method, options)
        points.append(
            {
                "method": method,
                "label": label,
                "storage_percent": bundle.storage["storage_percent"],
                "mae": mean_error(bundle),
                "seconds": time.perf_counter() - start,
            }
        )
        print(f"{label}: S {points[-1]['storage_percent']:.1f} %, MAE {points[-1]['mae']:.4e}")
    return points


def dominates(ours: list[dict[str, Any]], peer: dict[str, Any]) -> str:
    """Name the HydraOpt point with no more storage and no more error than ``peer``, if any."""
    for p in ours:
        smaller = p["storage_percent"] <= peer["storage_percent"]
        if p["method"] == "hydraopt" and smaller and p["mae"] <= peer["mae"]:
            return p["label"]
    return "none"


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    aset = load_adapter_set(args.adapters)
    ours = ours_points(aset)
    peers = vlora_points(aset, args.export) + lorashare_points(aset, args.lorashare_k)
    args.out.mkdir(parents=True, exist_ok=True)
    points = ours + peers
    lines = [
        "| system | S % | MAE | s | dominated by |",
        "| --- | ---: | ---: | ---: | --- |",
    ]
    for p in sorted(points, key=lambda p: p["storage_percent"]):
        who = dominates(ours, p) if p["method"] != "hydraopt" else ""
        lines.append(
            f"| {p['label']} | {p['storage_percent']:.1f} | {p['mae']:.4e} | "
            f"{p['seconds']:.1f} | {who} |"
        )
    table = "\n".join(lines)
    print(table)
    (args.out / "peers.md").write_text(table + "\n")
    (args.out / "peers.json").write_text(
        json.dumps({"adapters": [str(a) for a in args.adapters], "points": points}, indent=2)
    )
    plot_tradeoff(
        points,
        args.out / "peers.png",
        y_key="mae",
        y_label="MAE of ΔW (lower is better)",
        title="Storage vs reconstruction error: HydraOpt, vlora-dev, lorashare, classic merges",
    )


if __name__ == "__main__":
    main()
