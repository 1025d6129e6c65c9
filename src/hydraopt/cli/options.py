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


def add_bits_args(p: argparse.ArgumentParser, *, many: bool = False, auto: bool = False) -> None:
    """``--bits`` (one width, or with ``many`` a list) and ``--group-size`` (issue 19)."""
    g = p.add_argument_group("storage in bytes (docs/quantization.md)")
    widths = "16, 8 or 4" + (" (auto: chosen per module with --budget)" if auto else "")
    g.add_argument(
        "--bits",
        nargs="+" if many else None,
        default=["16"] if many else "16",
        metavar="BITS",
        help=(
            f"bit widths of the stored factors, each {widths}; one point per width"
            if many
            else f"bit width of the stored factors: {widths}"
        )
        + "; 16 = unquantized in --dtype (default 16)",
    )
    g.add_argument(
        "--group-size",
        type=int,
        default=64,
        metavar="G",
        help="values per float16 scale at 8/4 bits (even, >= 2; default 64)",
    )


def bits_values(args: argparse.Namespace, *, allow_auto: bool = False) -> list[int | str]:
    """``--bits`` checked (with ``--group-size``): 16/8/4 ints, or ``"auto"`` where allowed.

    Raises:
        HydraoptError: one line naming the bad value.
    """
    from hydraopt.errors import HydraoptError
    from hydraopt.quantize import check_quant_args

    given = args.bits if isinstance(args.bits, list) else [args.bits]
    out: list[int | str] = []
    for value in given:
        if value == "auto" and allow_auto:
            out.append("auto")
        elif value in ("16", "8", "4"):
            out.append(int(value))
        else:
            choices = "16, 8, 4 or auto" if allow_auto else "16, 8 or 4"
            raise HydraoptError(f"--bits must be {choices}, got {value!r}")
    if len(set(out)) != len(out):
        raise HydraoptError(f"--bits lists a width twice: {' '.join(map(str, given))}")
    try:
        check_quant_args(8, args.group_size)
    except ValueError as e:
        raise HydraoptError(f"--group-size: {e}") from None
    return out
