"""Entry point of the ``hydraopt`` console script.

Subcommand modules import torch (through the merge registry and the engine), which takes seconds.
So the parser is built in two steps: every subcommand is listed with its one-line summary from
:data:`SUBCOMMANDS` (no import), and only the subcommand named on the command line is imported
and registers its full parser. ``hydraopt --help``, ``hydraopt --version`` and an unknown command
therefore never import torch.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from hydraopt.errors import HydraoptError
from hydraopt.threads import apply_thread_defaults
from hydraopt.version import __version__

apply_thread_defaults()  # before any subcommand imports torch (OMP_WAIT_POLICY, see threads.py)

# Subcommand -> one-line summary for `hydraopt --help`. Each module hydraopt.cli.<name> exposes
# register(subparsers), which adds the full parser (same summary) and sets func=run(args) -> int.
SUBCOMMANDS: dict[str, str] = {
    "merge": "merge K adapters into a bundle (shared A' + M heads)",
    "export": "write one standard PEFT adapter dir per task from a bundle",
    "inspect": "storage table, A/B similarity, hard-routed error per task/module",
    "sweep": "HydraOpt M=1..K and every baseline -> JSON + PNG trade-off",
    "finetune": "fine-tune one LoRA or VeRA adapter on a task",
    "evaluate": "score zero-shot / LoRA / VeRA / bundles on tasks -> Table 1 (md, json, png)",
    "generate": "answer prompts with a bundle's task(s) on one base model (greedy)",
    "serve": "serve a bundle over an OpenAI-compatible HTTP API (model = task name)",
}
# Subcommands that need only the core install; the others need the 'eval' extra.
CORE = ("merge", "export", "inspect", "sweep")


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The ``hydraopt`` parser with ``command``'s full parser (``None``: summaries only).

    Args:
        command: The subcommand to import and register; ``"*"`` registers all of them (tests).
    """
    parser = argparse.ArgumentParser(
        prog="hydraopt",
        description="Compress many LoRA adapters into a shared A' and a few task heads (HydraOpt).",
        epilog="'hydraopt COMMAND --help' lists a command's arguments with their defaults.",
    )
    parser.add_argument("--version", action="version", version=f"hydraopt {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, summary in SUBCOMMANDS.items():
        if command not in (name, "*"):
            sub.add_parser(name, help=summary, add_help=False)
            continue
        try:
            module = importlib.import_module(f"hydraopt.cli.{name}")
        except ImportError as e:  # optional extras (e.g. eval) not installed
            if name in CORE:
                raise
            sub.add_parser(
                name,
                help=f"(unavailable: {e.name} not installed; pip install 'hydraopt[eval,serve]')",
            )
            continue
        module.register(sub)
    return parser


def chosen_command(argv: Sequence[str]) -> str | None:
    """The subcommand named in ``argv``: its first argument not starting with '-' (the top-level
    parser has no option that takes a value), or ``None``."""
    for arg in argv:
        if arg == "--":
            return None
        if not arg.startswith("-"):
            return arg if arg in SUBCOMMANDS else None
    return None


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(chosen_command(argv))
    args = parser.parse_args(argv)
    if not hasattr(args, "func"):
        parser.error(
            f"'{args.command}' is unavailable: install the 'eval' extra (and 'serve' for serve)"
        )
    try:
        return int(args.func(args) or 0)
    except HydraoptError as e:
        # One line whatever the message holds (a path may contain a newline).
        message = str(e).replace("\r", "\\r").replace("\n", "\\n")
        print(f"hydraopt: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        # Bundles and adapter dirs are written atomically, so none is left half-written;
        # evaluate's generation cache is kept on purpose so that a rerun resumes.
        print("hydraopt: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
