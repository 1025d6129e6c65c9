"""One sweep over merge methods: every method once, every M for the methods that take M.

``hydraopt sweep`` (the storage/error trade-off) and ``hydraopt evaluate --merge-from`` (the
paper's Table 1/3) both plan their runs here, so they agree on which bundles a sweep holds, how
each is labelled and where it is stored. Every run's config is built and checked (M against K)
before any merge starts.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from hydraopt.engine import EngineOptions, merge_adapter_set, resolve_config
from hydraopt.merge.base import SweepPoints, config_to_dict
from hydraopt.merge.registry import get_method
from hydraopt.progress import ProgressArg
from hydraopt.types import Bundle, VeraBundle


@dataclass(frozen=True)
class SweepRun:
    """One merge of a sweep.

    Attributes:
        method: registry name.
        config: the method's resolved config for the adapters' kind.
        label: the method's label for it (``hydraopt M=2``, ``ties``).
    """

    method: str
    config: Any
    label: str

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
) -> list[SweepRun]:
    """The runs of a sweep, in ``methods`` order, each config checked before any work.

    Args:
        methods: registry names; a method that takes M (``takes_heads``) runs once per M.
        num_tasks: K.
        kind: the adapters' kind (picks each method's config class).
        heads: the M values (default 1..K; empty: the methods that take M do not run).
        options: method name -> config fields for it (any ``heads`` is ignored: set per run).

    Raises:
        HydraoptError: for an unknown method, a bad option or an M outside 1..K.
    """
    runs = []
    for name in methods:
        method = get_method(name)
        given = {k: v for k, v in (options or {}).get(name, {}).items() if k != "heads"}
        # M comes from ``heads`` for the methods that take it; the others fix it themselves.
        ms: Sequence[int | None] = (
            (range(1, num_tasks + 1) if heads is None else heads) if method.takes_heads else [None]
        )
        # A method with storage points of its own (shared_basis: budgets) runs at each.
        points = method.sweep_points(given) if isinstance(method, SweepPoints) else [given]
        for point in points:
            for m in ms:
                config = resolve_config(name, {**point, "heads": m}, num_tasks, kind)
                label = method.label(method.num_heads(config, num_tasks))
                if isinstance(method, SweepPoints):
                    label += f" {method.point_label(config_to_dict(config))}"
                runs.append(SweepRun(name, config, label))
    return runs


def sweep(
    aset: Any,
    runs: Sequence[SweepRun],
    *,
    engine: EngineOptions | None = None,
    progress: ProgressArg = None,
    bytes_per_param: int = 2,
    on_start: Callable[[SweepRun], None] | None = None,
) -> Iterator[tuple[SweepRun, Bundle | VeraBundle]]:
    """Merge ``aset`` with every run in turn, yielding each bundle as it is done.

    Args:
        aset: the adapters (:func:`hydraopt.load_adapter_set`).
        runs: from :func:`plan_sweep`.
        engine: seed, device and memory budget (shared by every run).
        progress: as for :func:`~hydraopt.engine.merge_adapter_set` (each run reports its own).
        bytes_per_param: storage dtype size for the byte accounting.
        on_start: called with each run before it merges (e.g. to say so).
    """
    for run in runs:
        if on_start is not None:
            on_start(run)
        bundle = merge_adapter_set(
            aset,
            run.method,
            run.config,
            engine=engine,
            progress=progress,
            bytes_per_param=bytes_per_param,
        )
        yield run, bundle
