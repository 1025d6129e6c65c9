"""Argument groups shared by subcommands, and turning them into library calls."""

from __future__ import annotations

import argparse
from typing import Any

from hydraopt.engine import EngineOptions
from hydraopt.io.validate import check_option_values
from hydraopt.merge.distances import DISTANCES
from hydraopt.merge.registry import list_methods
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
    g = p.add_argument_group("merge method")
    if with_method:
        g.add_argument(
            "--method",
            default="hydraopt",
            choices=list_methods(),
            help="registry name (default hydraopt)",
        )
        g.add_argument("--heads", type=int, help="M, number of B heads (hydraopt: required, 1..K)")
    g.add_argument("--distance", choices=DISTANCES, help="hydraopt distance (default mae)")
    g.add_argument("--solver", choices=("fast", "paper"), help="hydraopt solver (default fast)")
    g.add_argument("--epochs", type=int, help="paper solver epochs (default 1000)")
    g.add_argument("--lr", type=float, help="paper solver learning rate (default 0.01)")
    g.add_argument("--temperature", type=float, help="paper solver T in softmax(C/T) (default 0.2)")
    g.add_argument("--restarts", type=int, help="fast solver k-means++ restarts (default 8)")
    g.add_argument(
        "--refine-steps",
        type=int,
        help="fast solver refinement steps (default 100, 20 at M = K; 0 = closed form)",
    )
    g.add_argument(
        "--refine-lr",
        type=float,
        help="fast solver refinement learning rate (default 1.0, 0.05 at M = K)",
    )
    g.add_argument(
        "--refine-precision",
        choices=("auto", "float32", "bfloat16"),
        help="fast solver: dtype of the MAE refinement's dense products (default auto: "
        "bfloat16 on CUDA and CPUs with fast bf16, else float32)",
    )
    g.add_argument(
        "--refine-tasks",
        type=int,
        help="fast solver: tasks per refinement step; more adapters are sampled (default 8)",
    )
    g.add_argument(
        "--start",
        choices=("auto", "closed_form"),
        help="fast solver, MAE: refine from the better of closed form and per-head medians "
        "(auto, default) or from the closed form only",
    )
    g.add_argument(
        "--shared",
        choices=("lambda_d", "lambda_b"),
        help="hydraopt on VeRA adapters: the vector all tasks share (default lambda_d)",
    )
    g.add_argument("--density", type=float, help="TIES/DARE fraction kept (default 0.5)")
    g.add_argument(
        "--weights", type=float, nargs="+", help="classic merges: one weight per adapter"
    )
    g.add_argument(
        "--majority-sign-method", choices=("total", "frequency"), help="TIES sign election"
    )


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


HYDRAOPT_ONLY = (
    "distance",
    "solver",
    "epochs",
    "lr",
    "temperature",
    "restarts",
    "refine_steps",
    "refine_lr",
    "refine_precision",
    "refine_tasks",
    "start",
    "shared",
)
CLASSIC_ONLY = ("density", "weights", "majority_sign_method")


def method_options(args: argparse.Namespace, method: str) -> dict[str, Any]:
    """The method-config fields the user gave (None = not given, left to the config default)."""
    keys = ("heads",) + (HYDRAOPT_ONLY if method == "hydraopt" else CLASSIC_ONLY)
    given = {k: getattr(args, k, None) for k in keys}
    weights = given.get("weights")
    if weights is not None:
        given["weights"] = tuple(weights)
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
