"""``hydraopt finetune TASK --out DIR``: train one LoRA or VeRA adapter on a task (PEFT dir out)."""

from __future__ import annotations

import argparse
import sys
from dataclasses import fields

from hydraopt.eval.finetune_config import ADAPTER_KINDS, FinetuneConfig
from hydraopt.eval.tasks import TASKS_ENV_VAR, resolve_task_dir

# CLI flag dest -> FinetuneConfig field per adapter kind (None: the flag does not apply to that
# kind). A flag left unset keeps the config's default, so the defaults live in one place (the
# dataclass).
_CONFIG_FLAGS: dict[str, dict[str, str | None]] = {
    "steps": {"lora": "steps", "vera": "steps"},
    "lr": {"lora": "lr", "vera": "vera_lr"},
    "rank": {"lora": "r", "vera": "vera_r"},
    "alpha": {"lora": "alpha", "vera": None},
    "projection_prng_key": {"lora": None, "vera": "projection_prng_key"},
    "batch_size": {"lora": "batch_size", "vera": "batch_size"},
    "max_len": {"lora": "max_len", "vera": "max_len"},
    "seed": {"lora": "seed", "vera": "seed"},
    "threads": {"lora": "threads", "vera": "threads"},
}


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
    parser.add_argument(
        "--lr",
        type=float,
        help=f"peak learning rate (default {defaults['lr']} for LoRA, {defaults['vera_lr']} "
        f"for VeRA)",
    )
    parser.add_argument(
        "--rank",
        type=int,
        help=f"LoRA rank r, or VeRA's projection dimension r (default {defaults['r']} for LoRA, "
        f"{defaults['vera_r']} for VeRA)",
    )
    parser.add_argument(
        "--alpha", type=int, help=f"lora_alpha, LoRA only (default {defaults['alpha']})"
    )
    parser.add_argument(
        "--projection-prng-key",
        type=int,
        help=f"seed of VeRA's shared projections, VeRA only; keep it equal for adapters to be "
        f"merged (default {defaults['projection_prng_key']})",
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
    for flag, by_kind in _CONFIG_FLAGS.items():
        value = getattr(args, flag)
        if value is None:
            continue
        field = by_kind[adapter]
        if field is None:
            usable = [kind for kind, name in by_kind.items() if name is not None]
            raise ValueError(
                f"--{flag.replace('_', '-')} applies to --adapter {' / '.join(usable)} only, "
                f"not {adapter}"
            )
        overrides[field] = value
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
