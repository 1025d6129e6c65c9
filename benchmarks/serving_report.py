"""The markdown table and the figures of benchmarks/serving.py (from its result dict)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def mib(x: float) -> str:
    return f"{x / 2**20:.1f}"


def write_report(result: dict[str, Any], out: Path, name: str = "serving") -> None:
    lines = [
        f"Machine: {result['machine']}; commit {result['commit']}; base model "
        f"SmolLM2-135M-Instruct (GGUF dequantised to float32); {result['settings']}.",
    ]
    if "memory" in result:
        lines += [
            "",
            "**(a) Adapter memory held** (tensor bytes exact; RSS growth = what the resident set "
            "grows by when the adapters are installed, in a child forked from the process holding "
            "the loaded base model, one child per row)",
            "",
            "| K | system | adapter tensors (MiB) | RSS growth (MiB) | tensors vs PEFT |",
            "| ---: | --- | ---: | ---: | ---: |",
        ]
        for K in sorted({m["K"] for m in result["memory"]}):
            rows = [m for m in result["memory"] if m["K"] == K]
            peft = next(m for m in rows if m["system"] == "peft")
            for m in rows:
                lines.append(
                    f"| {K} | {m['label']} | {mib(m['tensor_bytes'])} | {mib(m['rss_growth'])} | "
                    f"{m['tensor_bytes'] / peft['tensor_bytes']:.3f} |"
                )
    if "throughput" in result:
        t = result["throughput"]
        ceiling = t[0]["tokens_per_s"]
        lines += [
            "",
            f"**(b) Mixed-task throughput** ({result['workload']})",
            "",
            "| system | seconds (best) | all rounds | generated tokens/s | vs base (best) "
            "| vs base (median of per-round ratios) |",
            "| --- | ---: | --- | ---: | ---: | ---: |",
        ]
        lines += [
            f"| {x['system']} | {x['seconds']:.1f} | {', '.join(f'{v:.1f}' for v in x['all_seconds'])} "
            f"| {x['tokens_per_s']:.1f} | {x['tokens_per_s'] / ceiling:.2f} "
            f"| {x.get('median_round_ratio', float('nan')):.2f} |"
            for x in t
        ]
        if "load_average_1min_per_round" in t[0]:
            loads = ", ".join(f"{v:.1f}" for v in t[0]["load_average_1min_per_round"])
            lines += ["", f"Load average (1 min) at the start of each round: {loads}."]
        sw = result["switch"]
        lines += [
            "",
            "**(c) Task switch**: runtime (route a row to another task; nothing copied) "
            f"{sw['runtime_route_s'] * 1e6:.1f} µs; PEFT `set_adapter` (all K held) "
            f"{sw['peft_set_adapter_s'] * 1e3:.2f} ms; PEFT `load_adapter` + `delete_adapter` "
            f"from disk (one adapter held at a time) {sw['peft_load_adapter_s'] * 1e3:.0f} ms.",
        ]
    if "exactness" in result:
        lines += [
            "",
            "**(d) Exactness**: greedy answers of `hydraopt generate` (mixed batches) and of the "
            "server (concurrent requests, continuous batching) vs PEFT loading each task's "
            "exported adapter:",
            "",
        ]
        for e in result["exactness"]:
            got = ", ".join(
                f"{who} {e[f'{who}_equal']}/{e['prompts']}"
                for who in ("generate", "server")
                if f"{who}_equal" in e
            )
            lines.append(
                f"- {e['bundle']} (M = {e.get('heads', '?')}): {got} equal "
                f"({e['per_task']} prompts per task, {e.get('new_tokens', '?')} new tokens)"
            )
    if "margins" in result:
        lines += [
            "",
            "**(e) Margins** on the prompts of (d): PEFT (task's export, one prompt at a time) "
            "decodes greedily; the runtime reads the same tokens (teacher forcing). Smallest "
            "top-1/top-2 logit gap of PEFT over all steps, largest |runtime - PEFT| logit, steps "
            "where the runtime's argmax is not PEFT's token:",
            "",
            "| bundle | steps | smallest PEFT margin | largest logit difference | argmax differs |",
            "| --- | ---: | ---: | ---: | ---: |",
        ]
        lines += [
            f"| {m['bundle']} | {m['steps']} | {m['min_margin']:.4f} | {m['max_abs_diff']:.2e} "
            f"| {len(m['argmax_differs'])} |"
            for m in result["margins"]
        ]
    (out / f"{name}.md").write_text("\n".join(lines) + "\n")


def plot(result: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if "memory" in result:
        rows = [m for m in result["memory"] if "export" not in m["label"]]
        Ks = sorted({m["K"] for m in rows})
        cats = sorted({m["label"].split(" (")[0] for m in rows})
        fig, ax = plt.subplots(figsize=(7, 3.6))
        width = 0.8 / len(cats)
        for j, cat in enumerate(cats):
            values = [
                sum(
                    m["tensor_bytes"]
                    for m in rows
                    if m["K"] == K and m["label"].split(" (")[0] == cat
                )
                / 2**20
                for K in Ks
            ]
            ax.bar([i + j * width for i in range(len(Ks))], values, width, label=cat)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(Ks))], [f"K={K}" for K in Ks])
        ax.set_yscale("log")
        ax.set_ylabel("adapter tensors held (MiB)")
        ax.set_title("Adapter memory: runtime (A' once + M heads) vs PEFT (K adapters)")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "serving-memory.png", dpi=120)
    if "throughput" in result:
        fig, ax = plt.subplots(figsize=(7, 3.2))
        t = result["throughput"]
        ax.barh([x["system"] for x in t][::-1], [x["tokens_per_s"] for x in t][::-1])
        ax.set_xlabel("generated tokens/s")
        ax.set_title(f"Mixed-task throughput ({result['workload_short']})")
        fig.tight_layout()
        fig.savefig(out / "serving-throughput.png", dpi=120)
