"""What ``hydraopt inspect`` shows of VeRA adapters: storage for every M and shared side, λd/λb
similarity."""

from __future__ import annotations

from pathlib import Path

import torch

from hydraopt.cli.display import print_similarity_tables, print_table
from hydraopt.kinds.vera.analysis import vector_similarity
from hydraopt.kinds.vera.load import VeraAdapterSet
from hydraopt.merge import get_method
from hydraopt.storage import vera_storage_report


def show_storage(aset: VeraAdapterSet) -> list[dict]:
    """What HydraOpt with M = 1..K stores, for either shared vector."""
    K = len(aset.tasks)
    names = [m.name for m in aset.modules]
    proj = sum(t.numel() for t in aset.projections)
    rows, out = [], []
    for m in range(1, K + 1):
        for shared, rows_b, rows_d in (("lambda_d", m, 1), ("lambda_b", 1, m)):
            s = vera_storage_report(
                aset.modules, K, dict.fromkeys(names, rows_b), dict.fromkeys(names, rows_d), proj
            )
            label = f"{get_method('hydraopt').label(m)} (shared {shared})"
            rows.append([label, s.bundle_params, s.storage_percent])
            out.append({"heads": m, "shared": shared, **s.to_dict()})
    print_table(
        f"storage of {K} VeRA adapters over {len(aset.modules)} modules "
        f"({out[0]['adapters_params']} trained parameters; the {proj} projection parameters are "
        "shared and not counted)",
        ["bundle", "parameters", "S %"],
        rows,
    )
    return out


def show_similarity(
    aset: VeraAdapterSet, module_filter: str | None, plot: Path | None = None
) -> dict:
    """How alike the tasks' λd and λb are (relative mean absolute differences); no plot yet."""
    mods = [m for m in aset.modules if module_filter is None or module_filter in m.name]
    sim = vector_similarity(aset, mods)
    tasks = list(aset.tasks)
    print_similarity_tables(sim, ("lambda_d", "lambda_b"), tasks, len(mods))
    if len(tasks) > 1:
        off = ~torch.eye(len(tasks), dtype=torch.bool)
        d_rel = float(sim["lambda_d_relative"][off].mean())
        b_rel = float(sim["lambda_b_relative"][off].mean())
        print(f"mean relative difference between tasks: lambda_d {d_rel:.3f}, lambda_b {b_rel:.3f}")
    return {"tasks": tasks, **{k: v.tolist() for k, v in sim.items()}}
