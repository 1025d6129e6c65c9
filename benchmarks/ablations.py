"""Issue 20's ablations: the cost table (paper Table 17) and the report tables / plots.

``benchmarks/ablations.sh`` runs the merges and evaluations; this script measures the cost of
every registered merge method and turns the evaluation results into the tables of
``benchmarks/ABLATIONS.md``.

Usage:
    python benchmarks/ablations.py cost [--shapes examples llama-3.2-1b] [--threads 1]
        [--device cpu|cuda] [--out benchmarks/results/ablation-cost]
    python benchmarks/ablations.py report        # prints every table that has results

``cost`` runs each method in a fresh interpreter (as ``speed.py`` does), so the peak RSS
(``VmHWM``) is that merge's alone; it records the wall and CPU time of the merge call, the peak RSS,
the RSS once the adapters are loaded (the merge's own working set is the difference) and, on
CUDA, the peak allocated GPU memory. ``examples`` = the five shipped SmolLM2 adapters;
``llama-3.2-1b`` = five synthetic adapters of that shape (``synthetic.py``, cached under
``runs/ablations/synthetic``).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/ is not a package

from real_adapters import commit, machine  # noqa: E402
from speed import peak_rss_bytes  # noqa: E402
from synthetic import SHAPES, SyntheticSpec, ensure_adapters  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
EXAMPLES = REPO / "examples" / "adapters"
EN = ("en-gc", "en-sr", "en-ts", "en-ta", "en-qa")
SYNTHETIC_CACHE = REPO / "runs" / "ablations" / "synthetic"
HEADS = (1, 2, 5)  # HydraOpt rows of the cost table (K = 5)
BASIS_BUDGETS = (10, 20)  # shared_basis rows: percent of the separate adapters (it needs one)


# --- cost -------------------------------------------------------------------------------------


def cost_runs() -> list[tuple[str, str, dict[str, Any]]]:
    """(row label, registry name, options) for every registered method; HydraOpt at each M."""
    from hydraopt.merge.registry import list_methods

    runs: list[tuple[str, str, dict[str, Any]]] = []
    for method in list_methods():
        if method == "hydraopt":
            runs += [(f"hydraopt M={m}", method, {"heads": m}) for m in HEADS]
        elif method == "shared_basis":
            runs += [(f"shared_basis {b} %", method, {"budget": b}) for b in BASIS_BUDGETS]
        else:
            runs.append((method, method, {}))
    return runs


def child_main(config: dict[str, Any]) -> None:
    """One merge, measured; prints one JSON line (run in a fresh interpreter)."""
    import torch

    from hydraopt import load_adapter_set, merge_adapter_set
    from hydraopt.engine import EngineOptions

    torch.set_num_threads(config["threads"])
    aset = load_adapter_set(config["adapters"])
    loaded = peak_rss_bytes()
    # As `hydraopt merge` runs it: the result held in the bundle's dtype (float16).
    engine = EngineOptions(seed=0, device=config["device"], result_dtype="float16")
    start, cpu_start = time.perf_counter(), time.process_time()
    merge_adapter_set(aset, config["method"], config["options"], engine=engine)
    seconds = time.perf_counter() - start
    # CPU time too: on a shared machine the wall time mostly measures the other jobs.
    cpu_seconds = time.process_time() - cpu_start
    cuda = torch.cuda.max_memory_allocated() if config["device"] == "cuda" else None
    print(
        json.dumps(
            {
                "seconds": seconds,
                "cpu_seconds": cpu_seconds,
                "peak_rss": peak_rss_bytes(),
                "loaded_rss": loaded,
                "cuda": cuda,
            }
        )
    )


def adapter_dirs(shape: str) -> list[Path]:
    if shape == "examples":
        return [EXAMPLES / t for t in EN]
    return ensure_adapters(SyntheticSpec(SHAPES[shape]), len(EN), SYNTHETIC_CACHE)


def run_cost(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    torch.set_num_threads(args.threads)  # so machine() names the children's thread count
    rows = []
    for shape in args.shapes:
        dirs = adapter_dirs(shape)
        for label, method, options in cost_runs():
            if args.only and not any(label.startswith(o) for o in args.only):
                continue
            config = {
                "adapters": [str(d) for d in dirs],
                "method": method,
                "options": options,
                "device": args.device,
                "threads": args.threads,
            }
            cmd = [sys.executable, str(Path(__file__).resolve()), "child", json.dumps(config)]
            print(f"{shape}: {label} ...", file=sys.stderr, flush=True)
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
                rows.append({"shape": shape, "label": label, "failed": tail})
                continue
            result = json.loads(proc.stdout.strip().splitlines()[-1])
            rows.append({"shape": shape, "label": label, "method": method, **result})
    return {
        "machine": machine(),
        "commit": commit(),
        "threads": args.threads,
        "device": args.device,
        "rows": rows,
    }


def cost_markdown(result: dict[str, Any]) -> str:
    mib = 2**20
    shapes = list(dict.fromkeys(r["shape"] for r in result["rows"]))
    head = ["method"] + [
        f"{s} {col}" for s in shapes for col in ("wall s", "CPU s", "peak RSS MiB", "merge RSS MiB")
    ]
    if result["device"] == "cuda":
        head += [f"{s} GPU MiB" for s in shapes]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" + " ---: |" * (len(head) - 1)]
    labels = list(dict.fromkeys(r["label"] for r in result["rows"]))
    by = {(r["shape"], r["label"]): r for r in result["rows"]}
    for label in labels:
        cells = [label]
        for s in shapes:
            r = by.get((s, label), {"failed": "not run"})
            if "failed" in r:
                cells += ["failed", "", "", ""]
            else:
                cells += [
                    f"{r['seconds']:.2f}",
                    f"{r['cpu_seconds']:.2f}",
                    f"{r['peak_rss'] / mib:.0f}",
                    f"{(r['peak_rss'] - r['loaded_rss']) / mib:.0f}",
                ]
        if result["device"] == "cuda":
            cells += [f"{(by.get((s, label)) or {}).get('cuda', 0) / mib:.0f}" for s in shapes]
        lines.append("| " + " | ".join(cells) + " |")
    return (
        f"Machine: {result['machine']}; commit {result['commit']}; {result['threads']} torch "
        f"thread(s), device {result['device']}.\n\n" + "\n".join(lines) + "\n"
    )


# --- report -----------------------------------------------------------------------------------


def load_results(name: str) -> dict[str, Any] | None:
    path = RESULTS / name / "results.json"
    return json.loads(path.read_text()) if path.is_file() else None


def averages(name: str) -> dict[str, tuple[float, float, dict[str, float]]]:
    """label -> (S %, average, primary score per task) of an evaluation, {} if not run."""
    res = load_results(name)
    if res is None:
        return {}
    return {
        s["label"]: (
            s["storage_percent"],
            s["average"],
            {t: v["scores"]["primary"] for t, v in s["tasks"].items()},
        )
        for s in res["systems"]
    }


def table(rows: dict[str, tuple[float, float, dict[str, float]]]) -> str:
    lines = [
        "| system | S % | " + " | ".join(EN) + " | Avg |",
        "| --- | ---: |" + " ---: |" * (len(EN) + 1),
    ]
    for label, (storage, avg, per_task) in rows.items():
        cells = [f"{per_task.get(t, float('nan')):.1f}" for t in EN]
        lines.append(f"| {label} | {storage:.1f} | " + " | ".join(cells) + f" | {avg:.1f} |")
    return "\n".join(lines)


def reconstruction(bundle_dir: Path, adapters: Path = EXAMPLES) -> tuple[float, float]:
    """(relative MAE, relative squared error) of a bundle's ΔW' against the adapters' ΔW_i.

    Both over storing nothing: sum over modules and tasks of mean |ΔW_i - ΔW'_i| over that of
    mean |ΔW_i|, and likewise for squared Frobenius. Computed from the tensors (a bundle's own
    stored errors are in its merge distance), cached in ``bundle_dir/reconstruction.json``.
    """
    import torch
    from safetensors.torch import load_file

    from hydraopt.io.bundle import load_bundle

    cached = bundle_dir / "reconstruction.json"
    if cached.is_file():
        mae, sse = json.loads(cached.read_text())
        return mae, sse
    if not (bundle_dir / "bundle.json").is_file():
        return float("nan"), float("nan")
    bundle = load_bundle(bundle_dir)
    originals = {t: load_file(adapters / t / "adapter_model.safetensors") for t in bundle.tasks}
    sums = torch.zeros(4, dtype=torch.float64)  # |err|, |ΔW|, err², ΔW²
    view = bundle.lora_view()
    for spec in bundle.modules:
        a, heads, routing = view[spec.name]  # (r, k), (M, d, r), (K,)
        key = f"base_model.model.{spec.name}.lora_"
        for i, task in enumerate(bundle.tasks):
            b_i = originals[task][key + "B.weight"].float()  # (d, r)
            a_i = originals[task][key + "A.weight"].float()  # (r, k)
            delta = bundle.scales[task][spec.name] * b_i @ a_i  # (d, k)
            err = delta - heads[int(routing[i])] @ a  # (d, k)
            sums += torch.stack(
                [err.abs().mean(), delta.abs().mean(), err.square().sum(), delta.square().sum()]
            ).double()
    mae, sse = float(sums[0] / sums[1]), float(sums[2] / sums[3])
    cached.write_text(json.dumps([mae, sse]))
    return mae, sse


def distance_report() -> str:
    rows = averages("ablation-distance")
    if not rows:
        return "distance: not run yet"
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # Left: the scores per M; right: each distance minus MAE's score at the same M, against the
    # ~1-point noise of 150 examples per task (the curves on the left lie on top of each other).
    fig, (ax, delta_ax) = plt.subplots(1, 2, figsize=(9, 3.5))
    bundles = REPO / "runs" / "ablations" / "r32"
    grid = [
        "| distance | "
        + " | ".join(f"M={m}" for m in HEADS)
        + " | "
        + " | ".join(f"rel. MAE / SSE M={m}" for m in HEADS)
        + " |",
        "| --- |" + " ---: |" * 2 * len(HEADS),
    ]
    mae = [rows.get(f"hydraopt mae M={m}", (0, float("nan"), {}))[1] for m in HEADS]
    for d in ("mae", "mse", "fro", "cos"):
        avg = [rows.get(f"hydraopt {d} M={m}", (0, float("nan"), {}))[1] for m in HEADS]
        rel = [reconstruction(bundles / f"hydraopt_{d}_M{m}") for m in HEADS]
        grid.append(
            f"| {d} | "
            + " | ".join(f"{a:.1f}" for a in avg)
            + " | "
            + " | ".join(f"{e:.3f} / {q:.3f}" for e, q in rel)
            + " |"
        )
        ax.plot(HEADS, avg, marker="o", label=d.upper())
        delta_ax.plot(HEADS, [a - b for a, b in zip(avg, mae, strict=True)], marker="o")
    for label in ("LoRA", "zero-shot"):
        if label in rows:
            ax.axhline(rows[label][1], ls="--", lw=1, color="grey")
            ax.text(1, rows[label][1] + 0.5, label, fontsize=8, color="grey")
    ax.set(xlabel="M (heads)", ylabel="average score, 5 English tasks", xticks=list(HEADS))
    ax.set_title("HydraOpt distance (paper Fig. 5), SmolLM2-135M", fontsize=9)
    ax.legend(fontsize=8)
    delta_ax.axhspan(-1, 1, color="grey", alpha=0.15, label="±1 point (noise)")
    delta_ax.axhline(0, color="grey", lw=1)
    delta_ax.set(xlabel="M (heads)", ylabel="score − MAE's score", xticks=list(HEADS), ylim=(-2, 2))
    delta_ax.set_title("difference from MAE (the default)", fontsize=9)
    delta_ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(RESULTS / "ablation-distance" / "distance.png", dpi=120)
    return "\n".join(grid) + "\n\n" + table(rows)


def rank_report() -> str:
    cols = {r: averages(f"ablation-rank-r{r}") for r in (8, 16)}
    cols[32] = averages("table1")
    # Table 1's M = 1 row is the paper's objective (32.8); r = 8 / 16 merge with today's default
    # (heads x1.5), so r = 32 takes that default's row on the same test set for a like-for-like column.
    default_m1 = averages("ablation-ties-test").get("hydraopt M=1 (default, heads x1.5)")
    if default_m1 is not None:
        cols[32]["hydraopt M=1"] = default_m1
    labels = [
        "zero-shot",
        "LoRA",
        "task_arithmetic",
        "ties",
        "dare_linear",
        "dare_ties",
        *(f"hydraopt M={m}" for m in HEADS),
    ]
    lines = ["| system | S % | r = 8 | r = 16 | r = 32 |", "| --- | ---: | ---: | ---: | ---: |"]
    for label in labels:
        storage = next((c[label][0] for c in cols.values() if label in c), float("nan"))
        cells = [f"{cols[r][label][1]:.1f}" if label in cols[r] else "–" for r in (8, 16, 32)]
        lines.append(f"| {label} | {storage:.1f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# --- magnitude --------------------------------------------------------------------------------


def magnitude(args: argparse.Namespace) -> None:
    """How a bundle's ΔW' sits against each task's ΔW_i, averaged over modules (no decoding).

    Per module and task: cos(ΔW'_i, ΔW_i), ||ΔW'_i|| / ||ΔW_i|| and the least-squares scale
    c_i = <ΔW'_i, ΔW_i> / ||ΔW'_i||² that would best fit ΔW_i with c_i ΔW'_i. A c well above 1
    says the merge shrank the update (an elementwise median does); a head-magnitude
    calibration would multiply the heads by about c.
    """
    import torch
    from safetensors.torch import load_file

    from hydraopt.io.bundle import load_bundle

    root = Path(args.adapters)
    originals = {t: load_file(root / t / "adapter_model.safetensors") for t in EN}
    print("| bundle | task | cos | norm ratio | LS scale c |\n| --- | --- | ---: | ---: | ---: |")
    for path in args.bundles:
        bundle = load_bundle(path)
        stats = {t: torch.zeros(3) for t in bundle.tasks}
        view = bundle.lora_view()
        for spec in bundle.modules:
            a, heads, routing = view[spec.name]  # (r, k), (M, d, r), (K,)
            for i, task in enumerate(bundle.tasks):
                key = f"base_model.model.{spec.name}.lora_"
                b_i = originals[task][key + "B.weight"].float()  # (d, r)
                a_i = originals[task][key + "A.weight"].float()  # (r, k)
                delta = bundle.scales[task][spec.name] * b_i @ a_i  # (d, k)
                merged = heads[int(routing[i])] @ a  # (d, k)
                dot = (merged * delta).sum()
                stats[task] += torch.stack(
                    [
                        dot / (merged.norm() * delta.norm()),
                        merged.norm() / delta.norm(),
                        dot / merged.norm() ** 2,
                    ]
                )
        for task, (cos, ratio, scale) in stats.items():
            n = len(bundle.modules)
            print(
                f"| {Path(path).name} | {task} | {cos / n:.3f} | {ratio / n:.3f} | {scale / n:.2f} |"
            )


def scale_heads(args: argparse.Namespace) -> None:
    """Write a copy of a bundle with every head multiplied by ``--factor`` (head magnitude
    calibration, tried on val without touching the merge code)."""
    import dataclasses

    from hydraopt.io.bundle import load_bundle, save_bundle

    if (args.out / "bundle.json").is_file():
        return
    bundle = load_bundle(args.bundle)
    merged = {
        name: dataclasses.replace(m, heads=m.heads * args.factor)  # (M, d, r) scaled
        for name, m in bundle.merged.items()
    }
    # The stored errors were measured on the unscaled heads: drop them rather than mislead (the
    # directory name, e.g. m1-x1.5, says what the copy is).
    provenance = dataclasses.replace(bundle.provenance, errors={}, zero_errors={})
    save_bundle(
        dataclasses.replace(bundle, merged=merged, provenance=provenance), args.out, force=True
    )


def cost_report() -> str:
    """One table from every ``ablation-cost-<shape>`` run (the shapes side by side)."""
    runs = [json.loads(p.read_text()) for p in sorted(RESULTS.glob("ablation-cost-*/cost.json"))]
    if not runs:
        return "cost: not run yet"
    merged = {**runs[0], "rows": [row for run in runs for row in run["rows"]]}
    return cost_markdown(merged)


def report(_: argparse.Namespace) -> None:
    print("## cost\n\n" + cost_report() + "\n")
    print("## distance\n\n" + distance_report() + "\n")
    print("## rank\n\n" + rank_report() + "\n")
    for name in ("ablation-a-only", "ablation-val-core", "ablation-val", "ablation-val-test"):
        rows = averages(name)
        print(f"## {name}\n\n" + (table(rows) if rows else "not run yet") + "\n")
    for r in (8, 16):
        rows = averages(f"ablation-rank-r{r}")
        if rows:
            print(f"## rank r = {r}\n\n" + table(rows) + "\n")


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("cost", help="merge time and peak memory of every method")
    c.add_argument("--shapes", nargs="+", default=["examples", "llama-3.2-1b"])
    c.add_argument("--threads", type=int, default=1)
    c.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    c.add_argument("--out", type=Path, default=RESULTS / "ablation-cost")
    c.add_argument(
        "--only",
        nargs="+",
        default=[],
        metavar="LABEL",
        help="run only the rows whose label starts with one of these; the other rows of an "
        "existing OUT/cost.json are kept (one row re-measured without redoing the table)",
    )
    sub.add_parser("report", help="print the tables (and write the distance PNG)")
    mg = sub.add_parser("magnitude", help="merged ΔW' against each task's ΔW_i (no decoding)")
    mg.add_argument("bundles", nargs="+", type=Path)
    mg.add_argument("--adapters", type=Path, default=EXAMPLES)
    sc = sub.add_parser("scale-heads", help="copy a bundle with its heads times a factor")
    sc.add_argument("bundle", type=Path)
    sc.add_argument("--factor", type=float, required=True)
    sc.add_argument("--out", type=Path, required=True)
    ch = sub.add_parser("child", help=argparse.SUPPRESS)
    ch.add_argument("config")
    args = p.parse_args(argv)
    if args.command == "child":
        child_main(json.loads(args.config))
    elif args.command == "report":
        report(args)
    elif args.command == "magnitude":
        magnitude(args)
    elif args.command == "scale-heads":
        scale_heads(args)
    else:
        result = run_cost(args)
        old = args.out / "cost.json"
        if args.only and old.is_file():
            new = {(r["shape"], r["label"]) for r in result["rows"]}
            kept = [
                r
                for r in json.loads(old.read_text())["rows"]
                if (r["shape"], r["label"]) not in new
            ]
            result["rows"] = kept + result["rows"]
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "cost.json").write_text(json.dumps(result, indent=1) + "\n")
        (args.out / "cost.md").write_text(cost_markdown(result))
        print(cost_markdown(result))


if __name__ == "__main__":
    main()
