"""Argument groups shared by subcommands, and turning them into library calls."""

from __future__ import annotations

import argparse
from typing import Any

from hydraopt.cli.config_flags import add_config_flags, config_options, heads_help
from hydraopt.engine import EngineOptions
from hydraopt.io.validate import check_option_values
from hydraopt.merge.registry import get_method, list_methods
from hydraopt.threads import check_threads


def add_adapter_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "adapters", nargs="+", metavar="ADAPTER_DIR", help="PEFT LoRA adapter directories"
    )
    p.add_argument("--names", nargs="+", help="task names (default: the directory names)")
    p.add_argument(
        "--modules",
        metavar="REGEX",
        help="only modules whose name matches this regex (e.g. 'layers\\.1[0-9]\\.'); for quick looks",
    )
    p.add_argument(
        "--allow-pickle",
        action="store_true",
        help="accept adapter_model.bin (read with torch.load(weights_only=True))",
    )
    p.add_argument(
        "--base-model",
        metavar="DIR",
        help="VeRA adapters: base model dir whose layer shapes give each module's input features "
        "(default: the adapters' base_model_name_or_path if local or cached, else k = max_in)",
    )


def add_method_args(p: argparse.ArgumentParser, *, with_method: bool = True) -> None:
    """``--method``, ``--heads`` and one flag per method-config field (from the registry)."""
    g = p.add_argument_group(
        "merge method",
        "Each option below is a field of a method's config (docs/methods.md), in [brackets] the "
        "methods that take it; the chosen method ignores the others' options.",
    )
    if with_method:
        g.add_argument(
            "--method",
            default="hydraopt",
            choices=list_methods(),
            help="registry name (default hydraopt)",
        )
        g.add_argument("--heads", type=int, help=heads_help())
    add_config_flags(g)


def add_engine_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("engine")
    g.add_argument("--seed", type=int, default=0, help="seed of every random choice (default 0)")
    g.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    g.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    g.add_argument(
        "--engine",
        choices=("local", "ray"),
        default="local",
        help="run module groups in this process or as Ray tasks (pip install 'hydraopt[scale]'; "
        "default local)",
    )
    g.add_argument("--address", help="Ray cluster address (default: start a local Ray instance)")
    g.add_argument(
        "--dtype",
        default="float16",
        choices=("float16", "bfloat16", "float32"),
        help="dtype of the bundle's tensors (default float16: half the bytes of float32; the "
        "merge itself runs in float32)",
    )


def method_options(args: argparse.Namespace, method: str) -> dict[str, Any]:
    """The method-config fields the user gave (None = not given, left to the config default)."""
    given = config_options(args, get_method(method))
    check_option_values(given)
    return given


def load_selected(args: argparse.Namespace):
    """Load and validate the adapters, restricted to ``--modules`` if given."""
    import re

    from hydraopt.errors import HydraoptError
    from hydraopt.io.peft import load_adapter_set

    aset = load_adapter_set(
        adapter_dirs(args.adapters),
        args.names,
        allow_pickle=args.allow_pickle,
        base_model=getattr(args, "base_model", None),
    )
    if getattr(args, "modules", None):
        try:
            pattern = re.compile(args.modules)
        except re.error as e:
            raise HydraoptError(f"--modules: invalid regex ({e})") from e
        names = [m.name for m in aset.modules if pattern.search(m.name)]
        if not names:
            raise HydraoptError(f"--modules {args.modules!r} matches no module")
        aset = aset.select(names)
    return aset


def adapter_dirs(paths: list[str]) -> list[str]:
    """``paths`` without plain files, each skipped with a note on stderr: a shell glob such as
    ``examples/adapters/*`` also catches the README beside the adapter dirs."""
    import sys
    from pathlib import Path

    for path in paths:
        if Path(path).is_file():
            print(f"hydraopt: skipping {path}: a file, not an adapter directory", file=sys.stderr)
    return [path for path in paths if not Path(path).is_file()]


def engine_options(args: argparse.Namespace) -> EngineOptions:
    import torch

    check_threads(args.threads)
    if args.threads:
        torch.set_num_threads(args.threads)
    distance = getattr(args, "distance", None) or "mae"
    return EngineOptions(
        seed=args.seed,
        device=args.device,
        error_distance=distance,
        engine=args.engine,
        address=args.address,
        ray_threads=args.threads or 1,
        # The bundle is written in --dtype anyway: holding the result in it halves the driver's
        # memory at M = K, and casting now or at the save gives the same bits.
        result_dtype=args.dtype,
    )


BYTES = {"float16": 2, "bfloat16": 2, "float32": 4}
