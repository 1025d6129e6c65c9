"""``hydraopt finetune TASK --out DIR``: train one LoRA or VeRA adapter on a task (PEFT dir out)."""

from __future__ import annotations

import argparse
import sys
from dataclasses import fields

from hydraopt.eval.finetune_config import ADAPTER_KINDS, FINETUNE_KINDS, FinetuneConfig
from hydraopt.eval.tasks import TASKS_ENV_VAR, resolve_task_dir
from hydraopt.kinds.finetune_fields import FinetuneFlag

# Flags every kind reads as the same FinetuneConfig field. The others come from the kinds
# (KindFinetune.flags): a flag maps to each kind's own field (--lr: lr or vera_lr) and is refused
# for a kind that does not read it. A flag left unset keeps the config's default, so the defaults
# live in one place (the dataclasses).
SHARED_FLAGS = ("steps", "batch_size", "max_len", "seed", "threads")


def kind_flags() -> dict[str, dict[str, FinetuneFlag]]:
    """Flag dest -> {kind name: how that kind reads it}, in the kinds' declaration order."""
    flags: dict[str, dict[str, FinetuneFlag]] = {}
    for kind in FINETUNE_KINDS.values():
        for dest, flag in kind.flags.items():
            flags.setdefault(dest, {})[kind.kind] = flag
    return flags


def kind_flag_help(by_kind: dict[str, FinetuneFlag], defaults: dict[str, object]) -> str:
    """The help of a kind flag: what it means for each kind, and each kind's default."""
    meaning = ", or ".join(dict.fromkeys(flag.help for flag in by_kind.values()))
    if len(by_kind) == 1:
        ((name, flag),) = by_kind.items()
        only = f"{FINETUNE_KINDS[name].display_name} only{flag.note}"
        return f"{meaning}, {only} (default {defaults[flag.field]})"
    per_kind = ", ".join(
        f"{defaults[flag.field]} for {FINETUNE_KINDS[name].display_name}"
        for name, flag in by_kind.items()
    )
    return f"{meaning} (default {per_kind})"


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``finetune`` subcommand; it sets ``func=run``."""
    defaults = {f.name: f.default for f in fields(FinetuneConfig)}
    parser = subparsers.add_parser(
        "finetune",
        help="fine-tune one LoRA or VeRA adapter on a task",
        description=(
            "Fine-tune a LoRA (default) or VeRA adapter on a task's train split (loss on target "
            "tokens only) and write a standard PEFT adapter dir plus training.json. Every task "
            "trained with the same --seed starts from the same LoRA A; every VeRA adapter with "
            "the same --projection-prng-key shares its random projections. Both are what "
            "merging them assumes."
        ),
    )
    parser.add_argument(
        "task", help=f"task id (looked up under the tasks root, ${TASKS_ENV_VAR}) or a task dir"
    )
    parser.add_argument("--out", required=True, help="adapter dir to write")
    parser.add_argument(
        "--adapter",
        choices=ADAPTER_KINDS,
        default=defaults["adapter"],
        help=f"adapter kind (default {defaults['adapter']})",
    )
    parser.add_argument("--steps", type=int, help=f"optimizer steps (default {defaults['steps']})")
    for dest, by_kind in kind_flags().items():
        first = next(iter(by_kind.values()))
        parser.add_argument(
            f"--{dest.replace('_', '-')}",
            type=type(defaults[first.field]),
            help=kind_flag_help(by_kind, defaults),
        )
    parser.add_argument(
        "--batch-size", type=int, help=f"examples per step (default {defaults['batch_size']})"
    )
    parser.add_argument(
        "--max-len",
        type=int,
        help=f"longest training sequence in tokens; longer ones are skipped "
        f"(default {defaults['max_len']})",
    )
    parser.add_argument("--seed", type=int, help=f"seed (default {defaults['seed']})")
    parser.add_argument(
        "--threads", type=int, help="torch CPU threads (default: torch's own setting)"
    )
    parser.add_argument("--tasks-root", help=f"folder of task folders (default ${TASKS_ENV_VAR})")
    parser.add_argument(
        "--model", help="base model: a .gguf file or a model dir (default: packaged SmolLM2-135M)"
    )
    parser.add_argument("--force", action="store_true", help="replace an existing --out dir")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(func=run)


def config_from_args(args: argparse.Namespace) -> FinetuneConfig:
    """The ``FinetuneConfig`` the flags ask for.

    Raises:
        ValueError: For a flag that does not apply to ``--adapter`` (e.g. ``--alpha`` with
            VeRA), or a value the config refuses.
    """
    adapter = args.adapter
    overrides: dict[str, object] = {"adapter": adapter}
    for flag in SHARED_FLAGS:
        if getattr(args, flag) is not None:
            overrides[flag] = getattr(args, flag)
    for dest, by_kind in kind_flags().items():
        value = getattr(args, dest)
        if value is None:
            continue
        read_as = by_kind.get(adapter)
        if read_as is None:
            raise ValueError(
                f"--{dest.replace('_', '-')} applies to --adapter {' / '.join(by_kind)} only, "
                f"not {adapter}"
            )
        overrides[read_as.field] = value
    return FinetuneConfig(**overrides)  # type: ignore[arg-type]  # values typed by argparse


def run(args: argparse.Namespace) -> int:
    """Build the config from the flags and fine-tune; returns the exit code.

    Returns:
        0 on success, 2 for a problem the user can fix (bad flag value, missing task, existing
        output dir); the message goes to stderr.
    """
    from pathlib import Path

    from hydraopt.io.atomic import check_output_dir
    from hydraopt.threads import check_threads

    try:
        check_threads(args.threads)
        check_output_dir(Path(args.out), force=args.force, force_hint="--force")
        config = config_from_args(args)
        task_dir = resolve_task_dir(args.task, args.tasks_root)
        from hydraopt.eval.finetune import finetune  # heavy (transformers): only when used

        out = finetune(
            task_dir,
            args.out,
            config,
            model_path=args.model,
            overwrite=args.force,
            progress=not args.quiet,
        )
    except (ValueError, FileNotFoundError) as error:  # HydraoptError is a ValueError
        print(f"hydraopt finetune: error: {error}", file=sys.stderr)
        return 2
    print(out)
    return 0
