"""Storage in bytes vs reconstruction error: quantized separate adapters, TIES and HydraOpt at
16/8/4 bits, and the per-module byte budget — one Pareto front.

Every point is measured the same way: per module and task the hard-routed mean absolute error
between the original update s_i B_i A_i and what the stored (and, for 8/4 bits, quantized then
dequantized) factors give back, averaged over modules and tasks. Bytes are exact: 2 per value at
16 bits; codes + float16 group scales at 8/4 bits (hydraopt.quantize.quantized_nbytes); routing
1 byte per task and module when a module has more than one head. The x axis is the percentage
of the K separate adapters' 16-bit bytes.

Budget points choose per module one of the HydraOpt bundles' (M, bits) options with
hydraopt.budget.allocate, so that the summed error is as low as found within the bytes.

Usage:
  python benchmarks/quantized_front.py --adapters ../shared/adapters \
      [--bundles DIR ...] [--bits 16 8 4] [--group-size 64] [--budgets 10 15 20] --out DIR
Without --bundles, HydraOpt M = 1..K and TIES are merged in this process first.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from hydraopt import load_adapter_set, load_bundle, merge_adapter_set
from hydraopt.budget import Option, allocate
from hydraopt.quantize import dequantize, quantize, quantized_nbytes
from hydraopt.types import Bundle

REPO = Path(__file__).resolve().parents[1]


@dataclass
class Point:
    system: str
    bits: int
    nbytes: int
    errors: dict[str, float]  # module -> summed MAE over tasks


def stored(t: torch.Tensor, bits: int, group_size: int) -> tuple[torch.Tensor, int]:
    """What a tensor reads back as after storage at ``bits``, and its exact bytes."""
    if bits == 16:
        return t.to(torch.float16).float(), 2 * t.numel()
    q = quantize(t, bits, group_size)
    assert q.nbytes == quantized_nbytes(t.numel(), bits, group_size)
    return dequantize(q), q.nbytes


def separate_point(aset, targets, bits: int, group_size: int) -> Point:
    errors, total = {}, 0
    for spec in aset.modules:
        stack = aset.load_stack([spec])
        err = 0.0
        for i in range(len(aset.tasks)):
            a, na = stored(stack.A[0, i], bits, group_size)
            b, nb = stored(stack.B[0, i], bits, group_size)
            total += na + nb
            approx = stack.scale[0, i] * (b @ a)
            err += float((targets[spec.name][i] - approx).abs().mean())
        errors[spec.name] = err
    return Point("separate", bits, total, errors)


def bundle_point(bundle: Bundle, label: str, targets, bits: int, group_size: int) -> Point:
    errors, total = {}, 0
    view = bundle.lora_view()
    for spec in bundle.modules:
        a, heads, routing = view[spec.name]
        a_s, na = stored(a, bits, group_size)
        h_s, nh = stored(heads, bits, group_size)
        total += na + nh + (len(routing) if heads.shape[0] > 1 else 0)
        err = 0.0
        for i in range(len(bundle.tasks)):
            approx = h_s[int(routing[i])] @ a_s
            err += float((targets[spec.name][i] - approx).abs().mean())
        errors[spec.name] = err
    return Point(label, bits, total, errors)


def tensor_bytes(numel: int, bits: int, group_size: int) -> int:
    return 2 * numel if bits == 16 else quantized_nbytes(numel, bits, group_size)


def module_bytes(bundle: Bundle, name: str, bits: int, group_size: int) -> int:
    a, heads, routing = bundle.lora_view()[name]
    routing_bytes = len(routing) if heads.shape[0] > 1 else 0
    return (
        tensor_bytes(a.numel(), bits, group_size)
        + tensor_bytes(heads.numel(), bits, group_size)
        + routing_bytes
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--adapters", nargs="+", default=[str(REPO.parent / "shared" / "adapters")])
    p.add_argument("--bundles", nargs="*", default=[], help="LoRA bundle dirs (default: merge)")
    p.add_argument("--bits", type=int, nargs="+", default=[16, 8, 4])
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--budgets", type=float, nargs="+", default=[10.0, 15.0, 20.0])
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    start = time.perf_counter()
    aset = load_adapter_set(args.adapters)
    K = len(aset.tasks)
    targets = {}
    for spec in aset.modules:
        stack = aset.load_stack([spec])
        targets[spec.name] = stack.delta()[0]  # (K, d, k)
    if args.bundles:
        bundles = [load_bundle(d) for d in args.bundles]
    else:
        bundles = [
            merge_adapter_set(aset, "hydraopt", {"heads": m, "head_scale": 1.0})
            for m in range(1, K + 1)
        ]
        bundles.append(merge_adapter_set(aset, "ties", {}))
    labels = [f"hydraopt M={b.num_heads}" if b.method == "hydraopt" else b.method for b in bundles]
    reference = sum(2 * K * m.r * (m.d + m.k) for m in aset.modules)
    points = [separate_point(aset, targets, bits, args.group_size) for bits in args.bits]
    for bundle, label in zip(bundles, labels, strict=True):
        points += [bundle_point(bundle, label, targets, b, args.group_size) for b in args.bits]

    # Budget mode: per module one option: HydraOpt M at some bits, or the K separate adapters.
    hydra = [(b, lab) for b, lab in zip(bundles, labels, strict=True) if b.method == "hydraopt"]
    by_key = {(pt.system, pt.bits): pt for pt in points}
    options = []
    for spec in aset.modules:
        opts = []
        for bundle, label in hydra:
            for bits in args.bits:
                opts.append(
                    Option(
                        module_bytes(bundle, spec.name, bits, args.group_size),
                        by_key[(label, bits)].errors[spec.name],
                        f"{label} {bits}-bit",
                    )
                )
        for bits in args.bits:
            per_task = tensor_bytes(spec.r * spec.k, bits, args.group_size) + tensor_bytes(
                spec.d * spec.r, bits, args.group_size
            )
            opts.append(
                Option(
                    K * per_task,
                    by_key[("separate", bits)].errors[spec.name],
                    f"separate {bits}-bit",
                )
            )
        options.append(opts)
    budget_rows = []
    for pct in args.budgets:
        alloc = allocate(options, int(pct / 100 * reference))
        mix: dict[str, int] = {}
        for opts, c in zip(options, alloc.choice, strict=True):
            mix[opts[c].label] = mix.get(opts[c].label, 0) + 1
        budget_rows.append(
            {
                "system": f"budget {pct:g}%",
                "bits": "mixed",
                "bytes": alloc.nbytes,
                "percent": 100 * alloc.nbytes / reference,
                "mae": alloc.error / (K * len(aset.modules)),
                "mix": mix,
            }
        )

    rows = [
        {
            "system": pt.system,
            "bits": pt.bits,
            "bytes": pt.nbytes,
            "percent": 100 * pt.nbytes / reference,
            "mae": sum(pt.errors.values()) / (K * len(aset.modules)),
        }
        for pt in points
    ] + budget_rows
    for row in rows:  # Pareto: no other point both smaller and at least as good
        row["pareto"] = not any(
            o is not row and o["bytes"] <= row["bytes"] and o["mae"] < row["mae"] for o in rows
        )
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {
        "adapters": args.adapters,
        "tasks": list(aset.tasks),
        "group_size": args.group_size,
        "reference_bytes": reference,
        "seconds": round(time.perf_counter() - start, 1),
    }
    (args.out / "quantized_front.json").write_text(json.dumps({**meta, "rows": rows}, indent=2))
    lines = [
        f"K = {K} adapters ({', '.join(aset.tasks)}), {len(aset.modules)} modules; group size "
        f"{args.group_size}; reference = the separate adapters at 16 bits, {reference:,} bytes",
        "",
        "| system | bits | bytes | % of 16-bit separate | mean MAE | Pareto |",
        "| --- | ---: | ---: | ---: | ---: | :---: |",
    ]
    for row in sorted(rows, key=lambda r: r["bytes"]):
        lines.append(
            f"| {row['system']} | {row['bits']} | {row['bytes']:,} | {row['percent']:.1f} | "
            f"{row['mae']:.3e} | {'*' if row['pareto'] else ''} |"
        )
    for row in budget_rows:
        lines.append(f"\n{row['system']}: " + ", ".join(f"{k} x{v}" for k, v in row["mix"].items()))
    (args.out / "quantized_front.md").write_text("\n".join(lines) + "\n")
    plot(rows, args.out / "quantized_front.png")
    print("\n".join(lines))
    print(f"\n{meta['seconds']} s; wrote {args.out}/quantized_front.{{md,json,png}}")


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    families: dict[tuple[str, str], list[dict]] = {}
    for row in rows:
        family = "HydraOpt" if row["system"].startswith("hydraopt") else row["system"]
        if row["system"].startswith("budget"):
            family = "budget"
        families.setdefault((family, str(row["bits"])), []).append(row)
    for (family, bits), group in sorted(families.items()):
        group.sort(key=lambda r: r["percent"])
        label = f"{family} {bits}-bit" if bits != "mixed" else "per-module budget"
        ax.plot([r["percent"] for r in group], [r["mae"] for r in group], marker="o", label=label)
    front = sorted((r for r in rows if r["pareto"]), key=lambda r: r["percent"])
    ax.plot(
        [r["percent"] for r in front],
        [r["mae"] for r in front],
        color="black",
        linestyle=":",
        linewidth=1,
        label="Pareto front",
    )
    ax.set_xscale("log")
    ax.set_xlabel("stored bytes, % of the separate adapters at 16 bits (log)")
    ax.set_ylabel("hard-routed MAE (mean over modules and tasks)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
