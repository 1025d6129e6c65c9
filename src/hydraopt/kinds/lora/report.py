"""What ``hydraopt inspect`` shows of LoRA adapters: storage for every M, A/B similarity."""

from __future__ import annotations

from pathlib import Path

import torch

from hydraopt.cli.display import print_similarity_tables, print_table
from hydraopt.kinds.lora.analysis import factor_similarity, plot_similarity
from hydraopt.kinds.lora.load import AdapterSet
from hydraopt.merge import get_method
from hydraopt.storage import storage_report


def show_storage(aset: AdapterSet) -> list[dict]:
    """What HydraOpt with M = 1..K stores of these adapters (a table, and its rows)."""
    K = len(aset.tasks)
    rows, out = [], []
    for m in range(1, K + 1):
        s = storage_report(aset.modules, K, {mod.name: m for mod in aset.modules})
        rows.append([get_method("hydraopt").label(m), s.bundle_params, s.storage_percent])
        out.append({"heads": m, **s.to_dict()})
    print_table(
        f"storage of {K} adapters over {len(aset.modules)} modules "
        f"({storage_report(aset.modules, K, {mod.name: 1 for mod in aset.modules}).adapters_params} parameters)",
        ["bundle", "parameters", "S %"],
        rows,
    )
    return out


def show_similarity(aset: AdapterSet, module_filter: str | None, plot: Path | None) -> dict:
    """How alike the tasks' A and B are (tables, a line, optionally heatmaps); returns the numbers."""
    mods = [m for m in aset.modules if module_filter is None or module_filter in m.name]
    sim = factor_similarity(aset, mods)
    tasks = list(aset.tasks)
    print_similarity_tables(sim, ("A", "B"), tasks, len(mods))
    off = ~torch.eye(len(tasks), dtype=torch.bool)
    a_rel, b_rel = float(sim["A_relative"][off].mean()), float(sim["B_relative"][off].mean())
    print(
        f"mean relative difference between tasks: A {a_rel:.3f}, B {b_rel:.3f} "
        f"(B/A = {b_rel / a_rel:.1f}; absolute: A {float(sim['A'][off].mean()):.2e}, "
        f"B {float(sim['B'][off].mean()):.2e})"
        if len(tasks) > 1
        else "one adapter: nothing to compare"
    )
    if plot:
        plot_similarity(sim, tasks, plot)
        print(f"similarity plot written to {plot}")
    return {"tasks": tasks, **{k: v.tolist() for k, v in sim.items()}}
