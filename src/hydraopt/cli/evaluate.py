"""``hydraopt evaluate``: score systems on tasks -> Table 1 (markdown), JSON and a trade-off plot.

Systems are given as ``--system zero-shot``, ``--system lora=ROOT`` (``ROOT/<task>/`` PEFT LoRA
dirs, e.g. the output of ``hydraopt export``), ``--system vera=ROOT`` (the same with PEFT VeRA
dirs, e.g. ``hydraopt finetune --adapter vera`` or an exported VeRA merge), ``--system
lora@BITS=ROOT`` (the LoRA dirs kept separate, each A and B quantized at 8 or 4 bits with
``--group-size``) and ``--system bundle=DIR`` (a bundle, heads applied in memory), each
optionally ``:LABEL``-suffixed. ``--merge-from ADAPTER_ROOT`` first merges the per-task adapters
(LoRA or VeRA) with every ``--methods`` and HydraOpt ``--heads`` at every ``--bits`` width, and
with ``--budget PCT ...`` HydraOpt per-module M and widths under each byte budget (bundles cached
under ``OUT/bundles/``), and evaluates zero-shot, the separate adapters (LoRA: at every
``--bits`` width) and every bundle: the paper's Table 1 (LoRA) or Table 3 (VeRA) in one command,
in bytes. Generations are cached (``OUT/cache`` by
default), so a rerun only decodes what is new.

Model and generation code (transformers, PEFT) is imported inside :func:`run`, so building the
parser stays cheap.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from hydraopt.cli.bits import add_bits_args, bits_values
from hydraopt.cli.evaluate_merge import (
    build_budget_bundles,
    build_bundles,
    check_budgets,
    merge_kind,
)
from hydraopt.errors import HydraoptError
from hydraopt.eval.tasks import TASKS_ENV_VAR
from hydraopt.kinds.names import KIND_TRAITS

if TYPE_CHECKING:
    from hydraopt.eval.systems import System

DEFAULT_GROUP_SIZE = 64  # --group-size's default (hydraopt.quantized_bundle imports torch)
# The baselines of the paper's Table 1: TA, TIES, DARE, DARE-TIES.
DEFAULT_METHODS = ("task_arithmetic", "ties", "dare_linear", "dare_ties")
# --system KIND=ROOT: the separate adapters of each adapter kind, between these two.
SYSTEM_KINDS = ("zero-shot", *KIND_TRAITS, "bundle")
QUANTIZED_WIDTHS = ("16", "8", "4")  # --system KIND@BITS, for kinds stored as factor pairs


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``evaluate`` subcommand; it sets ``func=run``."""
    p = subparsers.add_parser(
        "evaluate",
        help="score zero-shot / LoRA / VeRA / bundles on tasks -> Table 1 (md, json, png)",
        description=(
            "Greedy-decode each task's split under every system, score it with the task's "
            "metric, and write OUT/results.{json,md,png}. Generations are cached by content "
            "(base model, adapter or bundle weights, task, settings): reruns decode only what "
            "is missing, and an interrupted run resumes."
        ),
    )
    p.add_argument("--tasks", nargs="+", required=True, help="task ids (or task dirs)")
    p.add_argument(
        "--system",
        action="append",
        default=[],
        metavar="SPEC",
        dest="systems",
        help="zero-shot | lora=ROOT | lora@BITS=ROOT (8 or 4: each adapter quantized, "
        "--group-size) | vera=ROOT | bundle=DIR, each with an optional :LABEL (repeatable)",
    )
    p.add_argument("--out", required=True, type=Path, help="results dir (created or reused)")
    p.add_argument("--limit", type=int, help="first N examples of each split (default all)")
    p.add_argument("--split", default="test", choices=("test", "val"), help="default test")
    p.add_argument("--batch-size", type=int, default=8, help="prompts per batch (default 8)")
    p.add_argument(
        "--max-new-tokens", type=int, help="generation cap for every task (default per task)"
    )
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    p.add_argument("--tasks-root", type=Path, help=f"folder of task folders (${TASKS_ENV_VAR})")
    p.add_argument("--model", type=Path, help="base model .gguf or dir (default packaged SmolLM2)")
    p.add_argument("--cache", type=Path, help="generation cache dir (default OUT/cache)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    g = p.add_argument_group("merging first (--merge-from)")
    g.add_argument(
        "--merge-from",
        type=Path,
        metavar="ADAPTER_ROOT",
        help="merge ADAPTER_ROOT/<task> (LoRA or VeRA) for --tasks; evaluate zero-shot, the "
        "separate adapters and every bundle",
    )
    g.add_argument(
        "--methods",
        nargs="*",
        default=list(DEFAULT_METHODS),
        help=f"baseline merge methods (default {' '.join(DEFAULT_METHODS)})",
    )
    g.add_argument(
        "--heads",
        type=int,
        nargs="*",
        help="M values of the methods that take M, i.e. HydraOpt (default 1..K; none: skip them)",
    )
    g.add_argument("--seed", type=int, default=0, help="merge seed (DARE's drop mask; default 0)")
    g.add_argument(
        "--budget",
        type=float,
        nargs="+",
        metavar="PCT",
        help="also HydraOpt in budget mode at each PCT (%% of the separate adapters' 16-bit "
        "bytes): M and the width (among --bits) chosen per module; LoRA only",
    )
    add_bits_args(p, many=True)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Build systems (merging first if asked), evaluate, write the report; returns 0."""
    from hydraopt.threads import check_threads

    check_threads(args.threads)  # before minutes of model loading, not inside torch
    check_budgets(args)  # before minutes of merging
    from hydraopt.cli.display import print_table
    from hydraopt.eval.harness import evaluate
    from hydraopt.eval.report import write_report
    from hydraopt.eval.results import EvalConfig

    config = EvalConfig(
        tasks=tuple(args.tasks),
        split=args.split,
        limit=args.limit,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        threads=args.threads,
        tasks_root=args.tasks_root,
        model_path=args.model,
        progress=not args.quiet,
    )
    systems = [
        parse_system(spec, tasks=args.tasks, group_size=args.group_size) for spec in args.systems
    ]
    if args.merge_from is not None:
        systems = merged_systems(args, systems)
    if not systems:
        raise HydraoptError(
            "nothing to evaluate: give --system (e.g. --system zero-shot) or --merge-from"
        )
    results = evaluate(systems, config, cache_dir=args.cache or args.out / "cache")
    paths = write_report(results, args.out)
    print_table(
        f"{config.split} split, primary metric per task (0..100)",
        ["system", "S %", *results.tasks, "Avg"],
        [
            [
                s.label,
                s.storage_percent,
                *(s.tasks[t].scores["primary"] for t in results.tasks),
                s.average,
            ]
            for s in results.systems
        ],
    )
    summary = results.to_json()
    rate = summary["tokens_per_second"]
    print(
        f"decoded {summary['generated_examples']} examples ({summary['generated_tokens']} tokens"
        + (f", {rate:.1f} tokens/s" if rate else "")
        + f"), {sum(r.cached for s in results.systems for r in s.tasks.values())} from the cache; "
        f"{results.seconds:.1f} s in total"
    )
    print(f"table: {paths['markdown']}\nplot:  {paths['plot']}\njson:  {paths['json']}")
    return 0


def parse_system(
    spec: str, *, tasks: Sequence[str] = (), group_size: int = DEFAULT_GROUP_SIZE
) -> System:
    """``zero-shot[:LABEL]``, ``lora=ROOT[:LABEL]``, ``lora@BITS=ROOT[:LABEL]``,
    ``vera=ROOT[:LABEL]`` or ``bundle=DIR[:LABEL]`` -> a system.

    Args:
        spec: the ``--system`` value.
        tasks: the tasks evaluated (``lora@BITS`` counts their adapters' bytes for S %).
        group_size: values per scale of ``lora@BITS``'s quantized factors.

    Raises:
        HydraoptError: For another kind or width, a missing dir, or an unreadable bundle.
    """
    from hydraopt.eval.quantized_lora import QuantizedLora
    from hydraopt.eval.systems import PER_TASK_SYSTEMS, ZeroShot, bundle_system

    kind, _, value = spec.partition("=")
    if not value:
        kind, _, zero_shot_label = kind.partition(":")
        if kind != "zero-shot":
            raise HydraoptError(
                f"--system {spec!r}: expected zero-shot, lora=ROOT, lora@BITS=ROOT, vera=ROOT or "
                f"bundle=DIR (+ optional :LABEL)"
            )
        return ZeroShot(zero_shot_label or "zero-shot")
    kind, at, width = kind.partition("@")
    traits = KIND_TRAITS.get(kind)
    quantizable = traits is not None and traits.separate_factors and width in QUANTIZED_WIDTHS
    if kind not in SYSTEM_KINDS[1:] or (at and not quantizable):
        raise HydraoptError(
            f"--system {spec!r}: unknown kind {kind + at + width!r}; use lora=ROOT, "
            f"lora@8=ROOT, lora@4=ROOT, vera=ROOT or bundle=DIR"
        )
    path, label = _split_label(value)
    if not path.is_dir():
        raise HydraoptError(f"--system {spec!r}: {path} is not a directory")
    if kind == "bundle":
        return bundle_system(path, label)
    if at and width != "16":
        return QuantizedLora(path, tuple(tasks), int(width), group_size, label or "")
    per_task = PER_TASK_SYSTEMS[kind]
    return per_task(root=path, label=label or per_task.label)


def _split_label(value: str) -> tuple[Path, str | None]:
    # A ':' may be part of a path; only treat it as the label separator if the whole value is
    # not itself an existing path.
    if ":" in value and not Path(value).exists():
        path, _, label = value.rpartition(":")
        return Path(path), label or None
    return Path(value), None


def merged_systems(args: argparse.Namespace, given: list[System]) -> list[System]:
    """Rows in the paper's order: zero-shot, the separate adapters (LoRA or VeRA, as
    ``--merge-from`` holds), the other ``given`` systems, the bundles.

    Zero-shot and the separate adapters of ``--merge-from`` are added unless ``given`` already
    has them.
    """
    from hydraopt.eval.quantized_lora import QuantizedLora
    from hydraopt.eval.systems import PER_TASK_SYSTEMS, ZeroShot, bundle_system

    root = args.merge_from
    kind = merge_kind(args)
    separate = PER_TASK_SYSTEMS[kind]
    zero_shot: list[System] = [s for s in given if isinstance(s, ZeroShot)] or [ZeroShot()]
    systems: list[System] = [*zero_shot]
    if not any(isinstance(s, separate) and s.root == root for s in given):
        systems.append(separate(root=root))
    if KIND_TRAITS[kind].separate_factors:  # the fair baseline in bytes: at every width
        for b in (int(w) for w in bits_values(args) if w != 16):
            if not any(
                isinstance(s, QuantizedLora)
                and (s.root, s.bits, s.group_size) == (root, b, args.group_size)
                for s in given
            ):
                systems.append(QuantizedLora(root, tuple(args.tasks), b, args.group_size))
    systems += [s for s in given if not isinstance(s, ZeroShot)]
    systems += [bundle_system(path) for path in build_bundles(args)]
    systems += [bundle_system(path) for path in build_budget_bundles(args)]
    return systems
