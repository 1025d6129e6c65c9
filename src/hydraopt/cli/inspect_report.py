"""What ``hydraopt inspect`` shows: storage, A/B (or λd/λb) similarity, routing and errors.

Apart from :mod:`hydraopt.cli.inspect` (the parser), which imports this module only when the
command runs: it needs torch, and ``hydraopt inspect --help`` should not wait for it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from hydraopt.analysis import error_by_task, factor_similarity, plot_similarity
from hydraopt.cli.display import print_table
from hydraopt.cli.merge import print_summary
from hydraopt.io.peft import AdapterSet
from hydraopt.kinds.vera.analysis import vector_similarity
from hydraopt.kinds.vera.load import VeraAdapterSet
from hydraopt.storage import storage_report, vera_storage_report
from hydraopt.types import Bundle, VeraBundle


def show_bundle(bundle: Bundle | VeraBundle, top: int) -> dict:
    print_summary(bundle)
    errors = bundle.provenance.errors
    dist = bundle.provenance.error_distance
    worst = sorted(errors.items(), key=lambda kv: -sum(kv[1]) / len(kv[1]))[:top]
    rows = []
    for name, errs in worst:
        routing = bundle.merged[name].routing.tolist()
        rows.append([name, sum(errs) / len(errs), max(errs), " ".join(map(str, routing))])
    print_table(
        f"worst {len(rows)} modules ({dist}); routing = head per task {list(bundle.tasks)}",
        ["module", f"mean {dist}", f"max {dist}", "routing"],
        rows,
    )
    return {
        "method": bundle.method,
        "config": bundle.config,
        "storage": bundle.storage.to_dict(),
        "error_by_task": error_by_task(bundle),
        "errors": errors,
        "routing": {n: m.routing.tolist() for n, m in bundle.merged.items()},
    }


def show_storage(aset: AdapterSet) -> list[dict]:
    K = len(aset.tasks)
    rows, out = [], []
    for m in range(1, K + 1):
        s = storage_report(aset.modules, K, {mod.name: m for mod in aset.modules})
        rows.append([f"hydraopt M={m}", s.bundle_params, s.storage_percent])
        out.append({"heads": m, **s.to_dict()})
    print_table(
        f"storage of {K} adapters over {len(aset.modules)} modules "
        f"({storage_report(aset.modules, K, {mod.name: 1 for mod in aset.modules}).adapters_params} parameters)",
        ["bundle", "parameters", "S %"],
        rows,
    )
    return out


def show_similarity(aset: AdapterSet, module_filter: str | None, plot: Path | None) -> dict:
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


def show_vera_storage(aset: VeraAdapterSet) -> list[dict]:
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
            rows.append([f"hydraopt M={m} (shared {shared})", s.bundle_params, s.storage_percent])
            out.append({"heads": m, "shared": shared, **s.to_dict()})
    print_table(
        f"storage of {K} VeRA adapters over {len(aset.modules)} modules "
        f"({out[0]['adapters_params']} trained parameters; the {proj} projection parameters are "
        "shared and not counted)",
        ["bundle", "parameters", "S %"],
        rows,
    )
    return out


def show_vera_similarity(
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


def print_similarity_tables(
    sim: dict[str, torch.Tensor], keys: tuple[str, ...], tasks: list[str], num_modules: int
) -> None:
    """One task x task table per factor: its relative mean absolute difference (0 = identical)."""
    for key in keys:
        print_table(
            f"mean |{key}_i - {key}_j| / mean |{key}| over {num_modules} modules (0 = identical)",
            ["", *tasks],
            [[t, *[float(v) for v in sim[f"{key}_relative"][i]]] for i, t in enumerate(tasks)],
        )


# What inspect shows of adapters, per adapter kind: (storage for every M, task similarity).
REPORTS: dict[str, tuple[Callable[..., list[dict]], Callable[..., dict]]] = {
    "lora": (show_storage, show_similarity),
    "vera": (show_vera_storage, show_vera_similarity),
}
