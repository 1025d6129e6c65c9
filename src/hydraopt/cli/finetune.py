"""``hydraopt finetune TASK --out DIR``: train one LoRA adapter on a task (PEFT adapter dir out)."""

from __future__ import annotations

import argparse
import sys
from dataclasses import fields

from hydraopt.eval.finetune_config import FinetuneConfig
from hydraopt.eval.tasks import TASKS_ENV_VAR, resolve_task_dir

# CLI flag dest -> FinetuneConfig field; a flag left unset keeps the config's default, so the
# defaults live in one place (the dataclass).
_CONFIG_FLAGS = {
    "steps": "steps",
    "lr": "lr",
    "rank": "r",
    "alpha": "alpha",
    "batch_size": "batch_size",
    "max_len": "max_len",
    "seed": "seed",
    "threads": "threads",
}


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``finetune`` subcommand; it sets ``func=run``."""
    defaults = {f.name: f.default for f in fields(FinetuneConfig)}
    parser = subparsers.add_parser(
        "finetune",
        help="fine-tune one LoRA adapter on a task",
        description=(
            "Fine-tune a LoRA adapter on a task's train split (loss on target tokens only) and "
            "write a standard PEFT adapter dir plus training.json. Every task trained with the "
            "same --seed starts from the same LoRA A, as HydraOpt assumes."
        ),
    )
    parser.add_argument(
        "task", help=f"task id (looked up under the tasks root, ${TASKS_ENV_VAR}) or a task dir"
    )
    parser.add_argument("--out", required=True, help="adapter dir to write")
    parser.add_argument("--steps", type=int, help=f"optimizer steps (default {defaults['steps']})")
    parser.add_argument("--lr", type=float, help=f"peak learning rate (default {defaults['lr']})")
    parser.add_argument("--rank", type=int, help=f"LoRA rank r (default {defaults['r']})")
    parser.add_argument("--alpha", type=int, help=f"lora_alpha (default {defaults['alpha']})")
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


def run(args: argparse.Namespace) -> int:
    """Build the config from the flags and fine-tune; returns the exit code.

    Returns:
        0 on success, 2 for a problem the user can fix (bad flag value, missing task, existing
        output dir); the message goes to stderr.
    """
    overrides = {
        field: getattr(args, flag)
        for flag, field in _CONFIG_FLAGS.items()
        if getattr(args, flag) is not None
    }
    try:
        config = FinetuneConfig(**overrides)
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
    except (ValueError, FileNotFoundError) as error:
        print(f"hydraopt finetune: error: {error}", file=sys.stderr)
        return 2
    print(out)
    return 0
