"""Entry point of the ``hydraopt`` console script."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from hydraopt.errors import HydraoptError
from hydraopt.version import __version__

# Subcommand modules; each exposes register(subparsers) and sets func=run(args) -> int.
SUBCOMMANDS = ("merge", "export", "inspect", "sweep", "finetune", "evaluate", "generate", "serve")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hydraopt",
        description="Compress many LoRA adapters into a shared A' and a few task heads (HydraOpt).",
    )
    parser.add_argument("--version", action="version", version=f"hydraopt {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in SUBCOMMANDS:
        try:
            module = importlib.import_module(f"hydraopt.cli.{name}")
        except ImportError as e:  # optional extras (e.g. eval) not installed
            if name in ("merge", "export", "inspect", "sweep"):
                raise
            sub.add_parser(
                name, help=f"(unavailable: {e.name} not installed; pip install 'hydraopt[eval]')"
            )
            continue
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "func"):
        parser.error(f"'{args.command}' is unavailable: install the 'eval' extra")
    try:
        return int(args.func(args) or 0)
    except HydraoptError as e:
        print(f"hydraopt: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        # Bundles and adapter dirs are written atomically, so none is left half-written;
        # evaluate's generation cache is kept on purpose so that a rerun resumes.
        print("hydraopt: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
