"""One sweep over merge methods: every method once, every M for the methods that take M.

``hydraopt sweep`` (the storage/error trade-off) and ``hydraopt evaluate --merge-from`` (the
paper's Table 1/3) both plan their runs here, so they agree on which bundles a sweep holds, how
each is labelled and where it is stored. Every run's config is built and checked (M against K)
before any merge starts. With bit widths (issue 19), each merge is stored at every width: one
merge, then one quantized bundle per width, errors re-measured after quantization.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from hydraopt.engine import EngineOptions, merge_adapter_set, resolve_config
from hydraopt.kinds.registry import get_kind
from hydraopt.merge.base import SweepPoints, config_to_dict
from hydraopt.merge.registry import get_method
from hydraopt.progress import ProgressArg
from hydraopt.quantized_bundle import (
    DEFAULT_GROUP_SIZE,
    check_bits,
    quantize_merged,
    separate_point,
)
from hydraopt.types import Bundle, ModuleSpec, VeraBundle


@dataclass(frozen=True)
class SweepRun:
    """One merge of a sweep.

    Attributes:
        method: registry name.
        config: the method's resolved config for the adapters' kind.
        label: the method's label for it (``hydraopt M=2``, ``ties``; ``hydraopt M=2 4-bit``).
        bits: 16 (unquantized), 8 or 4.
        group_size: values per scale at 8/4 bits.
    """

    method: str
    config: Any
    label: str
    bits: int = 16
    group_size: int = DEFAULT_GROUP_SIZE

    @property
    def dirname(self) -> str:
        """The label as a directory name (``hydraopt_M2``, ``shared_basis_10pct``): where a
        sweep keeps the bundle."""
        return self.label.replace(" %", "pct").replace(" ", "_").replace("=", "")


def plan_sweep(
    methods: Sequence[str],
    num_tasks: int,
    kind: str = "lora",
    *,
    heads: Sequence[int] | None = None,
    options: Mapping[str, Mapping[str, Any]] | None = None,
    bits: Sequence[int] = (16,),
    group_size: int = DEFAULT_GROUP_SIZE,
    modules: Sequence[ModuleSpec] = (),
) -> list[SweepRun]:
    """The runs of a sweep, in ``methods`` order, each config checked before any work.

    Args:
        methods: registry names; a method that takes M (``takes_heads``) runs once per M.
        num_tasks: K.
        kind: the adapters' kind (picks each method's config class).
        heads: the M values (default 1..K; empty: the methods that take M do not run).
        options: method name -> config fields for it (any ``heads`` is ignored: set per run).
        bits: the bit widths to store each merge at (16, 8, 4), one run each; a 16 keeps
            today's label, the others append `` 8-bit`` / `` 4-bit``.
        group_size: values per scale at 8/4 bits.
        modules: the adapters' modules, when known: a method's default storage points that
            cannot fit them are left out (``SweepPoints.sweep_points``).

    Raises:
        HydraoptError: for an unknown method, a bad option or an M outside 1..K.
        ValueError: a bad bit width or group size.
    """
    for b in bits:
        check_bits(b, group_size)
    runs = []
    for name in methods:
        method = get_method(name)
        given = {k: v for k, v in (options or {}).get(name, {}).items() if k != "heads"}
        # M comes from ``heads`` for the methods that take it; the others fix it themselves.
        ms: Sequence[int | None] = (
            (range(1, num_tasks + 1) if heads is None else heads) if method.takes_heads else [None]
        )
        # A method with storage points of its own (shared_basis: budgets) runs at each.
        points = (
            method.sweep_points(given, modules, num_tasks)
            if isinstance(method, SweepPoints)
            else [given]
        )
        for point in points:
            for m in ms:
                config = resolve_config(name, {**point, "heads": m}, num_tasks, kind)
                label = method.label(method.num_heads(config, num_tasks))
                if isinstance(method, SweepPoints):
                    label += f" {method.point_label(config_to_dict(config))}"
                for b in bits:
                    width = "" if b == 16 else f" {b}-bit"
                    runs.append(SweepRun(name, config, label + width, b, group_size))
    return runs


def sweep(
    aset: Any,
    runs: Sequence[SweepRun],
    *,
    engine: EngineOptions | None = None,
    progress: ProgressArg = None,
    bytes_per_param: int = 2,
    on_start: Callable[[SweepRun], None] | None = None,
    dtype: str = "float16",
) -> Iterator[tuple[SweepRun, Bundle | VeraBundle]]:
    """Merge ``aset`` with every run in turn, yielding each bundle as it is done.

    Args:
        aset: the adapters (:func:`hydraopt.load_adapter_set`).
        runs: from :func:`plan_sweep`.
        engine: seed, device and memory budget (shared by every run).
        progress: as for :func:`~hydraopt.engine.merge_adapter_set` (each run reports its own).
        bytes_per_param: storage dtype size for the byte accounting.
        on_start: called with each run before it merges (e.g. to say so).
        dtype: the bundles' dtype (what quantization starts from, as a saved bundle would).
    """
    last: tuple[str, Any, Bundle | VeraBundle] | None = None
    for run in runs:
        if on_start is not None:
            on_start(run)
        if last is not None and (last[0], last[1]) == (run.method, run.config):
            merged = last[2]  # the same merge at another bit width: merged once
        else:
            merged = merge_adapter_set(
                aset,
                run.method,
                run.config,
                engine=engine,
                progress=progress,
                bytes_per_param=bytes_per_param,
            )
            last = (run.method, run.config, merged)
        yield run, quantize_merged(merged, aset, run.bits, run.group_size, dtype=dtype)


def separate_points(
    aset: Any, bits: Sequence[int], group_size: int, distance: str
) -> list[dict[str, Any]]:
    """Sweep points of the K separate LoRA adapters stored at each of ``bits`` but 16 (the
    100 % reference), in the sweep's point format; none for VeRA adapters."""
    if not get_kind(aset.kind).separate_factors:
        return []
    reference = 2 * sum(len(aset.tasks) * m.r * (m.d + m.k) for m in aset.modules)
    points = []
    for b in bits:
        if b == 16:
            continue
        start = time.perf_counter()
        point = separate_point(aset, b, group_size, distance=distance)
        error = _mean(point.errors)
        zero = _mean(point.zero_errors)
        points.append(
            {
                "label": f"separate {b}-bit",
                "method": "separate",
                "heads": len(aset.tasks),
                "bits": b,
                "bytes": point.nbytes,
                "storage_percent": 100.0 * point.nbytes / reference,
                "error": error,
                "relative_error": error / zero if zero > 0 else 0.0,
                "seconds": time.perf_counter() - start,
                "config": {"group_size": group_size},
            }
        )
    return points


def mark_pareto(points: list[dict[str, Any]]) -> None:
    """Set ``pareto`` on each point: no other point has no more bytes and no higher error, with
    one of the two strictly lower (:func:`hydraopt.analysis.pareto_front`)."""
    from hydraopt.analysis import pareto_front

    front = {id(p) for p in pareto_front(points, "bytes", "error", higher=False)}
    for p in points:
        p["pareto"] = id(p) in front


def _mean(per_module: Mapping[str, list[float]]) -> float:
    values = [v for row in per_module.values() for v in row]
    return sum(values) / max(1, len(values))


def plot_bytes_front(
    points: Sequence[dict[str, Any]], path: Any, *, y_label: str, title: str
) -> None:
    """Bytes (% of the 16-bit separate adapters, log x) against relative error: one curve per
    method family and bit width, the Pareto front dotted, every point labelled."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from hydraopt.analysis import place_labels

    fig, ax = plt.subplots(figsize=(8, 5))
    families: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for p in points:
        families.setdefault((p["method"], p["bits"]), []).append(p)
    markers = {16: "o", 8: "s", 4: "^"}
    for (method, bits), group in sorted(families.items(), key=lambda kv: (kv[0][0], -kv[0][1])):
        group = sorted(group, key=lambda p: p["storage_percent"])
        xs = [p["storage_percent"] for p in group]
        ys = [p["relative_error"] for p in group]
        style = "-" if len(group) > 1 else ""
        ax.plot(xs, ys, style, marker=markers.get(bits, "o"), label=f"{method} {bits}-bit")
    front = sorted((p for p in points if p.get("pareto")), key=lambda p: p["storage_percent"])
    ax.plot(
        [p["storage_percent"] for p in front],
        [p["relative_error"] for p in front],
        ":",
        color="black",
        linewidth=1,
        label="Pareto front",
    )
    ax.set_xscale("log")
    ax.set_xlabel("stored bytes, % of the K separate adapters at 16 bits (log)")
    ax.set_ylabel(y_label)
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=7, frameon=False)
    fig.canvas.draw()
    place_labels(ax, [(p["label"], p["storage_percent"], p["relative_error"]) for p in points])
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
